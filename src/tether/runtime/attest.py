"""Objective attestation: what a beam was started to do, hashed before it runs.

The attestation is one JSON document (``v`` 1)::

    {
      "v": 1,
      "beam": "b-3f9c0a1b2c3d",
      "objective": "Summarise the open incidents",
      "grants": ["model:gpt-4o-mini", "egress:api.github.com"],
      "argv": ["python", "agent.py"],
      "base_fs": "<sha256 hex>",         # base_fs_digest() of the read-only roots
      "tools": ["<sha256 hex>", ...]     # one per tool definition it may use, sorted
    }

Its digest is SHA-256 over its RFC 8785 canonical JSON. It is recorded as the first entry of
the beam's audit session (``beam.attest``, ``data.attestation`` and ``data.sha256``), and the
beam's token carries the same digest as its ``objective_sha256``: the token's objective *is*
the attested document. Anyone holding the token and the log can check that the entry
re-hashes to the digest in the token, and that the entry is in a signed checkpoint.

The document is passed through the audit log's redaction first (an argv holding an API key
keeps ``[REDACTED]`` in its place), so the recorded entry re-hashes to the digest exactly.

The base filesystem digest
--------------------------
SHA-256 over a listing of every entry below each read-only root the sandbox binds (the
interpreter's prefix, ``/usr`` and the like): one line ``path NUL type NUL size NUL mtime_ns``
per entry, in sorted order, ``__pycache__`` directories skipped (Python writes them as it
imports; they are derived). It is a fingerprint of what was installed, not a content hash: it
changes when a package is installed, removed or upgraded, and does not notice a file rewritten
with its size and mtime preserved.

Walking ``/usr`` takes seconds, so the digest is cached per boot (keyed by the kernel's
``boot_id`` and the roots) in a file under the temp directory, and recomputed when one of the
roots, the dpkg database or a ``site-packages`` directory changes its mtime (what any install
does). A server computes it once in the background at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.audit.canonical import canonical_json
from tether.audit.redact import redact
from tether.errors import BadRequest

__all__ = [
    "ATTESTATION_VERSION",
    "DEFAULT_BASE_ROOTS",
    "BaseFsDigest",
    "attestation_digest",
    "base_fs_digest",
    "build_attestation",
    "tool_digest",
]

ATTESTATION_VERSION = 1
MAX_ATTESTATION_BYTES = 16 * 1024  # the authority's limit on an objective
_SKIP_DIRS = frozenset({"__pycache__"})
_STAMP_FILES = ("/var/lib/dpkg/status",)


def _default_roots() -> tuple[str, ...]:
    roots = ["/usr", os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)]
    out: list[str] = []
    for r in roots:
        # a root inside another is already covered by its walk
        if not any(r == o or r.startswith(o.rstrip("/") + "/") for o in out):
            out = [o for o in out if not o.startswith(r.rstrip("/") + "/")]
            out.append(r)
    return tuple(sorted(out))


DEFAULT_BASE_ROOTS = _default_roots()


def tool_digest(tool: Mapping[str, Any]) -> str:
    """SHA-256 of a tool definition's canonical JSON (name, description, schema ...)."""
    try:
        return hashlib.sha256(canonical_json(dict(tool))).hexdigest()
    except BadRequest as e:
        raise BadRequest(f"tool definition is not canonical JSON: {e.message}") from e


def build_attestation(
    *,
    beam_id: str,
    objective: str,
    grants: Sequence[str],
    argv: Sequence[str],
    base_fs: str,
    tools: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The attestation document, redacted as the log will store it. Raises BadRequest if it is
    larger than a token's objective may be."""
    doc: dict[str, Any] = {
        "v": ATTESTATION_VERSION,
        "beam": beam_id,
        "objective": objective,
        "grants": list(grants),
        "argv": list(argv),
        "base_fs": base_fs,
        "tools": sorted(tool_digest(t) for t in tools),
    }
    clean: dict[str, Any] = redact(doc)
    if len(canonical_json(clean)) > MAX_ATTESTATION_BYTES:
        raise BadRequest(
            f"the attestation (objective, grants, argv, tools) is larger than "
            f"{MAX_ATTESTATION_BYTES} bytes; shorten the objective or the command"
        )
    return clean


def attestation_digest(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(doc))).hexdigest()


# -- the base filesystem digest -------------------------------------------------------------


def _listing_digest(roots: Sequence[str]) -> tuple[str, int]:
    """(digest, entries) over the sorted listing of everything below ``roots``."""
    h = hashlib.sha256()
    count = 0
    for root in sorted(roots):
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            subdirs: list[str] = []
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
                if kind == "d":
                    if e.name in _SKIP_DIRS:
                        continue
                    subdirs.append(e.path)
                size = 0 if kind == "d" else st.st_size
                h.update(f"{e.path}\0{kind}\0{size}\0{st.st_mtime_ns}\n".encode())
                count += 1
            stack.extend(reversed(subdirs))  # depth first, in name order
    return h.hexdigest(), count


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _site_dirs(roots: Sequence[str]) -> list[str]:
    out: list[str] = []
    for root in roots:
        for sub in ("lib",):
            base = Path(root) / sub
            try:
                pys = [p for p in base.iterdir() if p.name.startswith("python")]
            except OSError:
                continue
            for py in pys:
                for name in ("site-packages", "dist-packages"):
                    if (py / name).is_dir():
                        out.append(str(py / name))
    return sorted(out)


def _stamps(roots: Sequence[str]) -> dict[str, int]:
    """mtimes that move when anything is installed: cheap to read on every beam."""
    out: dict[str, int] = {}
    for p in (*roots, *_STAMP_FILES, *_site_dirs(roots)):
        try:
            out[p] = os.stat(p).st_mtime_ns
        except OSError:
            out[p] = -1
    return out


class BaseFsDigest:
    """The base filesystem digest for one set of roots, cached per boot (see the module doc).

    ``get()`` returns it, computing it at most once per process while stamps hold; ``warm()``
    starts that computation in a background thread so the first beam rarely waits."""

    def __init__(self, roots: Sequence[str] = DEFAULT_BASE_ROOTS, cache_dir: Path | None = None):
        self.roots = tuple(sorted(roots))
        key = hashlib.sha256("\0".join(self.roots).encode()).hexdigest()[:16]
        base = cache_dir or Path(tempfile.gettempdir()) / f"tether-basefs-{os.getuid()}"
        self.cache_dir = base
        self.cache_path = base / f"{_boot_id()}-{key}.json"
        self._lock = threading.Lock()
        self._value: tuple[str, dict[str, int]] | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"BaseFsDigest(roots={self.roots!r})"

    def warm(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.get, name="tether-basefs", daemon=True)
            self._thread.start()

    def get(self) -> str:
        stamps = _stamps(self.roots)
        with self._lock:
            if self._value is not None and self._value[1] == stamps:
                return self._value[0]
            cached = self._read_cache(stamps)
            if cached is None:
                cached, _ = _listing_digest(self.roots)
                self._write_cache(cached, stamps)
            self._value = (cached, stamps)
            return cached

    def _read_cache(self, stamps: dict[str, int]) -> str | None:
        try:
            doc = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("stamps") != stamps:
            return None
        digest = doc.get("digest")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def _write_cache(self, digest: str, stamps: dict[str, int]) -> None:
        try:
            self.cache_dir.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(self.cache_dir)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return  # someone else's directory (or a symlink): do not write through it
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"digest": digest, "roots": self.roots, "stamps": stamps}))
            tmp.replace(self.cache_path)
        except OSError:
            pass  # the cache only saves time


_SHARED: dict[tuple[str, ...], BaseFsDigest] = {}
_SHARED_LOCK = threading.Lock()


def base_fs_digest(roots: Sequence[str] = DEFAULT_BASE_ROOTS) -> BaseFsDigest:
    """The process-wide :class:`BaseFsDigest` for ``roots``."""
    key = tuple(sorted(roots))
    with _SHARED_LOCK:
        found = _SHARED.get(key)
        if found is None:
            found = _SHARED[key] = BaseFsDigest(key)
        return found
