"""Secret removal before anything reaches the audit log.

Two rules, applied to event data (structurally) and to bodies (as text):

* **by key**: the value under a key that names a secret (``authorization``, ``token``,
  ``access_token``, ``api_key``, ``x-api-key``, ``password``, ``secret``, ``credential``,
  ``private_key``, ``cookie``, and any key ending in ``_token``, ``_secret``, ``_password``,
  ``_api_key`` or ``_private_key``; case-insensitive, ``-`` and ``_`` alike, at any depth) is
  replaced by ``"[REDACTED]"``, whatever its type;
* **by shape**: inside any string, a JWT/JWS/JWE (``eyJ...`` dot-separated base64url) becomes
  ``"[REDACTED jwt sha256:<16 hex>]"`` (the digest of the token lets an investigator correlate
  two events carrying the same token without seeing it); ``Authorization:`` header values,
  ``Bearer``/``Basic`` credentials of 16 characters or more,
  provider API keys (``sk-...``, ``sk-ant-...``, ``ghp_...``, ``AKIA...``, ``AIza...``,
  ``xox?-...``), Tether user credentials (``tether_uc_...``), PEM private keys, and
  ``"secret_key": "value"`` / ``secret_key=value`` pairs inside text become ``[REDACTED]``.

Redaction is deliberately greedy: a false positive costs a readable field, a false negative
leaks a credential into a log that is kept forever and handed to auditors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact", "redact_bytes", "redact_text"]

REDACTED = "[REDACTED]"

_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "subject_token",
        "actor_token",
        "api_key",
        "apikey",
        "x_api_key",
        "x_goog_api_key",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "credential",
        "credentials",
        "private_key",
        "cookie",
        "set_cookie",
    }
)
_SECRET_SUFFIXES = ("_token", "_secret", "_password", "_api_key", "_apikey", "_private_key")

# Key names as they appear in text (JSON members, headers, query strings), lower case: the
# rules that use them run on a lower-cased copy, then splice the replacement into the original.
_KEY_TEXT = (
    r"token|secret|passw(?:or)?d|api[_-]?key|private[_-]?key|authorization|credentials?|cookie"
)
_KEY_ANCHORS = ("token", "secret", "passw", "key", "authorization", "credential", "cookie")
_B64U = r"[A-Za-z0-9_-]"
_RED = REDACTED.encode()


class _Rule:
    """One secret shape: a regex, literals one of which any match contains (checked first, in
    the lower-cased text, so text without them never meets the regex), and what replaces it.

    ``folded`` rules are written in lower case and matched against the lower-cased text;
    the span from the end of group 1 (or the match start) to the match end is replaced."""

    def __init__(
        self,
        pattern: str,
        anchors: tuple[str, ...],
        *,
        folded: bool = False,
        keep_prefix: bool = False,
        quoted: bool = False,
        jwt: bool = False,
    ) -> None:
        self.text = re.compile(pattern, re.DOTALL)
        self.bytes = re.compile(pattern.encode(), re.DOTALL)
        self.anchors = anchors
        self.anchors_b = tuple(a.encode() for a in anchors)
        self.folded = folded
        self.keep_prefix = keep_prefix
        self.jwt = jwt
        self.red = f'"{REDACTED}"' if quoted else REDACTED
        self.red_b = self.red.encode()

    def apply_text(self, text: str, low: str) -> str:
        if self.jwt:
            return self.text.sub(lambda m: _jwt_marker(m.group(0).encode()), text)
        if not self.folded or len(low) != len(text):
            flags = re.DOTALL | (re.IGNORECASE if self.folded else 0)
            return re.sub(self.text.pattern, self._sub_t, text, flags=flags)
        out: list[str] = []
        pos = 0
        for m in self.text.finditer(low):
            cut = m.end(1) if self.keep_prefix else m.start()
            out += (text[pos:cut], self.red)
            pos = m.end()
        return text if not out else "".join(out) + text[pos:]

    def _sub_t(self, m: re.Match[str]) -> str:
        return (m.group(1) if self.keep_prefix else "") + self.red

    def apply_bytes(self, body: bytes, low: bytes) -> bytes:
        if self.jwt:
            return self.bytes.sub(lambda m: _jwt_marker(m.group(0)).encode(), body)
        if not self.folded:
            return self.bytes.sub(
                lambda m: (m.group(1) if self.keep_prefix else b"") + self.red_b, body
            )
        out: list[bytes] = []
        pos = 0
        for m in self.bytes.finditer(low):  # bytes.lower() keeps every offset
            cut = m.end(1) if self.keep_prefix else m.start()
            out += (body[pos:cut], self.red_b)
            pos = m.end()
        return body if not out else b"".join(out) + body[pos:]


_RULES = (
    # JWS (3 segments) and JWE (5); the header is base64url JSON, so it starts "eyJ".
    _Rule(rf"eyJ{_B64U}{{6,}}\.{_B64U}*\.{_B64U}*(?:\.{_B64U}*\.{_B64U}+)?", ("eyj",), jwt=True),
    _Rule(
        r"-----begin [a-z ]*private key-----.*?-----end [a-z ]*private key-----",
        ("private key",),
        folded=True,
    ),
    _Rule(
        r"(\b(?:proxy-)?authorization:[ \t]*)[^\r\n\"]+",
        ("authorization",),
        folded=True,
        keep_prefix=True,
    ),
    _Rule(
        r"(\b(?:bearer|basic)\s+)[a-z0-9._~+/=-]{16,}",
        ("bearer", "basic"),
        folded=True,
        keep_prefix=True,
    ),
    _Rule(
        rf'((?:{_KEY_TEXT})\\?"\s*:\s*)\\?"(?!\[redacted)(?:[^"\\]|\\.)*"',
        _KEY_ANCHORS,
        folded=True,
        keep_prefix=True,
        quoted=True,
    ),
    _Rule(
        rf"((?:{_KEY_TEXT})=)(?!\[redacted)[^&\s\"']+",
        _KEY_ANCHORS,
        folded=True,
        keep_prefix=True,
    ),
    _Rule(
        r"\b(?:sk-[A-Za-z0-9_-]{16,}|tether_[a-z]{2}_[A-Za-z0-9_-]{16,}"
        r"|gh[pousr]_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,})",
        ("sk-", "tether_", "gh", "akia", "aiza", "xox"),
    ),
)
# The shortest string any rule can match ('token=x').
_MIN_SECRET_LEN = 7
# Strings already seen to hold no secret (identifiers, grants, model names repeat a lot).
# Only clean strings are kept, so no secret lives on here.
_CLEAN: dict[str, None] = {}
_CLEAN_MAX_LEN = 256
_CLEAN_MAX_ITEMS = 16384
_KEY_CACHE: dict[str, bool] = {}


def is_secret_key(key: str) -> bool:
    """True when the value under ``key`` must never be recorded."""
    hit = _KEY_CACHE.get(key)
    if hit is None:
        k = key.lower().replace("-", "_")
        hit = k in _SECRET_KEYS or k.endswith(_SECRET_SUFFIXES)
        if len(_KEY_CACHE) < 4096:  # keys are a small vocabulary; bound it anyway
            _KEY_CACHE[key] = hit
    return hit


def _jwt_marker(token: bytes) -> str:
    return f"[REDACTED jwt sha256:{hashlib.sha256(token).hexdigest()[:16]}]"


def redact_text(text: str) -> str:
    """``text`` with every secret-shaped substring replaced."""
    if len(text) < _MIN_SECRET_LEN or text in _CLEAN:
        return text
    original = text
    low = text.lower()
    for rule in _RULES:
        for a in rule.anchors:
            if a in low:
                break
        else:
            continue
        text = rule.apply_text(text, low)
        low = text.lower()
    if text is original and len(text) <= _CLEAN_MAX_LEN:
        if len(_CLEAN) >= _CLEAN_MAX_ITEMS:
            _CLEAN.clear()
        _CLEAN[text] = None
    return text


def redact_bytes(body: bytes) -> bytes:
    """A body with every secret-shaped substring replaced (works on any ASCII-compatible
    text: JSON, HTTP, SSE, plain prompts; binary bodies pass through unchanged unless they
    happen to contain such a shape)."""
    if len(body) < _MIN_SECRET_LEN:
        return body
    low = body.lower()
    for rule in _RULES:
        for a in rule.anchors_b:
            if a in low:
                break
        else:
            continue
        body = rule.apply_bytes(body, low)
        low = body.lower()
    return body


def redact(data: Any) -> Any:
    """A copy of ``data`` (JSON-like: mappings, lists, tuples, scalars) with secrets removed.

    Mappings become dicts and tuples become lists; other values are returned as they are.
    """
    if isinstance(data, str):
        return redact_text(data)
    if isinstance(data, Mapping):
        out: dict[Any, Any] = {}
        for k, v in data.items():
            if isinstance(k, str) and v is not None and is_secret_key(k):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return data
