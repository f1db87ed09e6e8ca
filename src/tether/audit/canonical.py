"""RFC 8785 JSON Canonicalization Scheme (JCS): the exact bytes an audit entry is hashed as.

:func:`canonical_json` takes a fast path through ``orjson`` only when its output provably equals
JCS, and otherwise the ``rfc8785`` reference implementation. For a typical event the fast path,
type walk included, costs ~4-5 us here against ~50 us for the reference (``bench/bench_merkle.py``).
Why the fast path is exact:

* **strings**: JCS escapes ``"``, ``\\``, and U+0000..U+001F (``\\b \\t \\n \\f \\r`` short, the
  rest ``\\u00xx`` lowercase) and writes everything else as literal UTF-8. orjson does the same;
  ``tests/audit/test_canonical.py`` checks every code point outside the surrogates. Lone
  surrogates make orjson raise, and the fallback refuses them too.
* **integers**: JCS writes a number the way ECMAScript prints a double. For integers of
  magnitude at most 2**53 - 1 that is the plain decimal orjson writes; larger ones are outside
  I-JSON: orjson's ``OPT_STRICT_INTEGER`` raises on them and the fallback refuses them.
* **floats** take the fallback: orjson's float text differs from ECMAScript's (``1.0``, ``1e+21``).
* **key order**: JCS sorts object keys by UTF-16 code units, orjson by code point (the UTF-8 byte
  order). A BMP character is one UTF-16 unit equal to its code point, so for keys made only of BMP
  characters the two orders are the same total order. A character above U+FFFF becomes a surrogate
  pair (U+D800..U+DFFF), which sorts *below* U+E000..U+FFFF in UTF-16 but above them by code
  point, so any such key takes the fallback.
* **types**: only exact ``dict``, ``list``, ``tuple``, ``str``, ``int``, ``bool`` and ``None``
  take the fast path. orjson also encodes subclasses, enums, dataclasses and datetimes in ways
  ``rfc8785`` does not; those go to the fallback, which accepts what rfc8785 accepts (plus any
  ``Mapping``, copied to a ``dict``) and refuses the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson
import rfc8785

from tether.errors import BadRequest

__all__ = ["MAX_SAFE_INTEGER", "canonical_json", "is_canonical", "parse_canonical"]

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer magnitude I-JSON (RFC 7493) and so JCS can carry exactly."""

_NON_BMP = re.compile("[\U00010000-\U0010ffff]")
_SCALARS = frozenset({str, int, bool, type(None)})
_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER


def _dict_ok(d: dict[Any, Any]) -> bool:
    """True when orjson's sorted output for ``d`` is guaranteed to be its JCS serialization.

    Integer range is left to orjson's ``OPT_STRICT_INTEGER``, which raises beyond 53 bits.
    """
    for k, v in d.items():
        if type(k) is not str or (not k.isascii() and _NON_BMP.search(k)):
            return False
        t = type(v)
        if t in _SCALARS:
            continue
        if t is dict:
            if not _dict_ok(v):
                return False
        elif t is list or t is tuple:
            if not _list_ok(v):
                return False
        else:
            return False
    return True


def _list_ok(items: list[Any] | tuple[Any, ...]) -> bool:
    for v in items:
        t = type(v)
        if t in _SCALARS:
            continue
        if t is dict:
            if not _dict_ok(v):
                return False
        elif t is list or t is tuple:
            if not _list_ok(v):
                return False
        else:
            return False
    return True


def _fast_path_equals_jcs(obj: Any) -> bool:
    t = type(obj)
    if t is dict:
        return _dict_ok(obj)
    if t is list or t is tuple:
        return _list_ok(obj)
    return t in _SCALARS


def _plain(obj: Any) -> Any:
    """Copy non-dict mappings to dicts so the reference implementation accepts them."""
    if isinstance(obj, Mapping) and not isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> bytes:
    """The RFC 8785 canonical JSON bytes of ``obj``.

    Raises :class:`~tether.errors.BadRequest` for what JCS cannot represent: NaN or infinite
    floats, integers beyond +-(2**53 - 1), non-string keys, lone surrogates, other types.
    """
    if _fast_path_equals_jcs(obj):
        try:
            return orjson.dumps(obj, option=_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # lone surrogate, big integer, deep nesting: the reference decides or refuses
    try:
        return rfc8785.dumps(_plain(obj))
    except rfc8785.CanonicalizationError as e:
        raise BadRequest(f"value cannot be canonical JSON: {e}") from e
    except UnicodeError as e:  # a lone surrogate in a key
        raise BadRequest("value cannot be canonical JSON: a string is not valid Unicode") from e
    except RecursionError as e:
        raise BadRequest("value is nested too deeply for canonical JSON") from e


def _number(text: str) -> int | float:
    # JCS numbers are doubles: an integer literal beyond 2**53 is the canonical form of a float
    # (1e20 is written 100000000000000000000), and only that float's text is canonical.
    n = int(text)
    return n if -MAX_SAFE_INTEGER <= n <= MAX_SAFE_INTEGER else float(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_canonical(data: bytes) -> Any:
    """Parse ``data`` and return the value if ``data`` is exactly its canonical JSON, else raise.

    For verifiers: raises :class:`~tether.errors.BadRequest` naming why the bytes are not
    canonical (invalid JSON or UTF-8, non-JCS number or string forms, unsorted or duplicate keys,
    whitespace).
    """
    try:
        value = json.loads(data.decode("utf-8"), parse_int=_number, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise BadRequest(f"not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest("JSON is nested too deeply") from e
    if canonical_json(value) != data:
        raise BadRequest("JSON is not in RFC 8785 canonical form")
    return value


def is_canonical(data: bytes) -> bool:
    """Whether ``data`` is exactly the canonical JSON of the value it encodes.

    Prefer :func:`parse_canonical` in verification code: it cannot be ignored by mistake.
    """
    try:
        parse_canonical(data)
    except BadRequest:
        return False
    return True
