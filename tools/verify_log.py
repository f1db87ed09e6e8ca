#!/usr/bin/env python3
"""Verify an exported Tether audit log against a signed checkpoint, with no Tether code.

    python tools/verify_log.py --log export.jsonl --checkpoint checkpoint.txt \\
        --key '<name>+<hex8>+<base64 key>' [--origin ORIGIN] [--bodies DIR]

Needs only the Python standard library and ``cryptography`` (for Ed25519). It checks, in order:

1. the checkpoint is a C2SP tlog-checkpoint (https://c2sp.org/tlog-checkpoint) in a C2SP signed
   note (https://c2sp.org/signed-note) carrying a valid Ed25519 signature by ``--key``
   (signatures by other keys, such as witnesses, are ignored) and, with ``--origin``, that its
   origin line is ORIGIN;
2. every line of the export is one entry: UTF-8 JSON, exactly its RFC 8785 (JCS) canonical form,
   an object whose ``"index"`` is its line number (from 0), ending in a newline;
3. each ``"bodies"`` value maps names to SHA-256 hex digests and, with ``--bodies DIR``, each body
   exists as ``DIR/<sha256 hex>`` with that digest;
4. the RFC 9162 Merkle tree head over the first ``size`` lines (each leaf is the line's bytes
   without its newline, hashed ``SHA-256(0x00 || line)``) equals the checkpoint's root hash.

Exit status: 0 when everything verifies (``OK: N entries, root ..., checkpoint signed by NAME``),
1 when something does not (the message names the first bad entry: ``entry 17: ...``), 2 when the
tool cannot run (bad arguments, unreadable file, malformed key).

The JCS serializer here is small and complete: strings as the stdlib ``json`` module escapes them
(the same escapes JCS uses), object keys sorted by UTF-16 code units, integers up to 2**53 - 1
in decimal, and every other number as the double it denotes, printed the ECMAScript way (shortest
round-trip digits from ``repr``, then ECMAScript's fixed/exponent rules). Lone surrogates,
NaN/Infinity and duplicate keys are refused, as I-JSON requires.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import decimal
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_SAFE_INTEGER = 2**53 - 1
MAX_SIGNATURES = 100
SIG_PREFIX = "\u2014 "
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Invalid(Exception):
    """The input does not verify (exit 1)."""


class Unusable(Exception):
    """The tool cannot run with these arguments (exit 2)."""


# --- RFC 8785 (JCS) ------------------------------------------------------------------------


def jcs_number(x: float) -> str:
    """ECMAScript Number::toString for a finite double (RFC 8785 section 3.2.2.3)."""
    if math.isnan(x) or math.isinf(x):
        raise Invalid("NaN and Infinity are not JSON")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + jcs_number(-x)
    # repr gives the shortest digits that round-trip, the same digits ECMAScript chooses.
    _, digit_tuple, exp = decimal.Decimal(repr(x)).as_tuple()
    exponent = int(exp)  # always an int for a finite value
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent += len(digit_tuple) - len(digits)
    k = len(digits)
    n = exponent + k  # the value is 0.<digits> * 10**n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{mantissa}e{sign}{abs(e)}"


def jcs(value: Any) -> str:
    """The RFC 8785 canonical text of a value parsed by :func:`parse_json`."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise Invalid(f"integer {value} is outside the I-JSON range")
        return str(value)
    if isinstance(value, float):
        return jcs_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(f"{jcs(k)}:{jcs(value[k])}" for k in keys) + "}"
    raise Invalid(f"unexpected JSON value of type {type(value).__name__}")


def _parse_int(text: str) -> int | float:
    # JCS numbers are doubles: beyond 2**53 an integer literal is the canonical text of a float.
    n = int(text)
    return n if -MAX_SAFE_INTEGER <= n <= MAX_SAFE_INTEGER else float(text)


def _refuse_constant(name: str) -> NoReturn:
    raise Invalid(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Invalid("duplicate object key")
    return obj


def parse_json(raw: bytes) -> Any:
    """Parse one entry's bytes strictly (UTF-8, no NaN/Infinity, no duplicate keys)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("not valid UTF-8") from e
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_constant=_refuse_constant,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as e:
        raise Invalid(f"not valid JSON ({e.msg} at column {e.colno})") from e
    except RecursionError as e:
        raise Invalid("JSON nested too deeply") from e


def check_canonical(raw: bytes) -> Any:
    """Return the parsed value if ``raw`` is exactly its JCS form; raise :class:`Invalid`."""
    value = parse_json(raw)
    try:
        canonical = jcs(value).encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid("a string holds a lone surrogate (not valid Unicode)") from e
    if canonical != raw:
        raise Invalid("not in RFC 8785 canonical form (re-serialized bytes differ)")
    return value


# --- C2SP signed note and checkpoint ---------------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    key_id: bytes
    public: Ed25519PublicKey


def _valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() or c < " " for c in name)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("bad base64") from e


def parse_vkey(vkey: str) -> Key:
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3 or not _valid_name(parts[0]) or not _HEX8.fullmatch(parts[1]):
        raise Unusable("--key is not a verifier key <name>+<hex8>+<base64>")
    name, hex_id, b64 = parts
    try:
        raw = _b64(b64)
    except ValueError as e:
        raise Unusable("--key: bad base64") from e
    if len(raw) != 33 or raw[0] != 0x01:
        raise Unusable("--key is not an Ed25519 (type 0x01) verifier key")
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if key_id.hex() != hex_id.lower():
        raise Unusable(f"--key: key ID {hex_id} does not match the key")
    try:
        public = Ed25519PublicKey.from_public_bytes(raw[1:])
    except ValueError as e:
        raise Unusable("--key holds an invalid Ed25519 key") from e
    return Key(name, key_id, public)


def open_note(note: str, key: Key) -> str:
    """Return the text of a signed note carrying a valid signature by ``key``."""
    try:
        note.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid("checkpoint: not valid UTF-8") from e
    if _CONTROL.search(note):
        raise Invalid("checkpoint: contains control characters")
    split = note.rfind("\n\n")
    if split < 0:
        raise Invalid("checkpoint: no blank line before the signature lines")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise Invalid("checkpoint: has no signature lines")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise Invalid(f"checkpoint: more than {MAX_SIGNATURES} signatures")
    ours: bytes | None = None
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise Invalid("checkpoint: malformed signature line")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        try:
            blob = _b64(b64)
        except ValueError as e:
            raise Invalid("checkpoint: malformed signature line") from e
        if not _valid_name(name) or len(blob) < 5:
            raise Invalid("checkpoint: malformed signature line")
        if ours is None and name == key.name and blob[:4] == key.key_id:
            ours = blob[4:]
    if ours is None:
        raise Invalid(f"checkpoint: not signed by {key.name}+{key.key_id.hex()}")
    try:
        key.public.verify(ours, text.encode("utf-8"))
    except InvalidSignature as e:
        raise Invalid(f"checkpoint: invalid signature by {key.name}+{key.key_id.hex()}") from e
    return text


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes


def parse_checkpoint(text: str) -> Checkpoint:
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not lines[0] or any(not line for line in lines[3:]):
        raise Invalid("checkpoint: malformed text (origin, size, root hash, extension lines)")
    if not _DECIMAL.fullmatch(lines[1]):
        raise Invalid("checkpoint: tree size is not a decimal number without leading zeros")
    try:
        root = _b64(lines[2])
    except ValueError as e:
        raise Invalid("checkpoint: root hash is not base64") from e
    if len(root) != 32 or base64.b64encode(root).decode() != lines[2]:
        raise Invalid("checkpoint: root hash is not 32 bytes of canonical base64")
    return Checkpoint(lines[0], int(lines[1]), root)


# --- RFC 9162 Merkle tree --------------------------------------------------------------------


class TreeHead:
    """Streaming MTH: keeps one hash per set bit of the size (the complete subtrees so far)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def add(self, leaf_data: bytes) -> None:
        h = hashlib.sha256(b"\x00" + leaf_data).digest()
        n = self.size
        while n & 1:  # each trailing 1 bit is a complete subtree the new leaf now pairs with
            h = hashlib.sha256(b"\x01" + self._stack.pop() + h).digest()
            n >>= 1
        self._stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return hashlib.sha256(b"").digest()
        acc = self._stack[-1]
        for h in reversed(self._stack[:-1]):
            acc = hashlib.sha256(b"\x01" + h + acc).digest()
        return acc


# --- the log ----------------------------------------------------------------------------------


def entries(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, line bytes without newline); the last line must end in a newline."""
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.endswith(b"\n"):
                raise Invalid(f"entry {i}: line does not end with a newline (truncated export?)")
            yield i, line[:-1]


def check_bodies(i: int, bodies: Any, directory: Path | None) -> None:
    if not isinstance(bodies, dict):
        raise Invalid(f'entry {i}: "bodies" is not an object')
    for name, digest in bodies.items():
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise Invalid(f"entry {i}: body {name!r} is not a lowercase SHA-256 hex digest")
        if directory is None:
            continue
        path = directory / digest
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError as e:
            raise Invalid(f"entry {i}: body {name!r} ({digest}) is missing from {directory}") from e
        except OSError as e:
            raise Unusable(f"cannot read body {path}: {e.strerror}") from e
        if h.hexdigest() != digest:
            raise Invalid(f"entry {i}: body {name!r} does not hash to {digest}")


def verify(
    log: Path, checkpoint_note: str, key: Key, origin: str | None, bodies: Path | None
) -> str:
    cp = parse_checkpoint(open_note(checkpoint_note, key))
    if origin is not None and cp.origin != origin:
        raise Invalid(f"checkpoint: origin is {cp.origin!r}, expected {origin!r}")
    tree = TreeHead()
    count = 0
    for i, raw in entries(log):
        try:
            entry = check_canonical(raw)
        except Invalid as e:
            raise Invalid(f"entry {i}: {e}") from e
        if not isinstance(entry, dict):
            raise Invalid(f"entry {i}: not a JSON object")
        index = entry.get("index")
        if type(index) is not int or index != i:
            raise Invalid(f"entry {i}: index is {index!r}, expected {i} (entries out of order?)")
        if "bodies" in entry:
            check_bodies(i, entry["bodies"], bodies)
        if i < cp.size:
            tree.add(raw)
        count = i + 1
    if count < cp.size:
        raise Invalid(
            f"entry {count}: missing; the export has {count} entries, the checkpoint covers "
            f"{cp.size}"
        )
    root = tree.root()
    if root != cp.root:
        raise Invalid(
            f"root mismatch: entries 0..{cp.size - 1} hash to "
            f"{base64.b64encode(root).decode()}, the checkpoint says "
            f"{base64.b64encode(cp.root).decode()} (an entry was altered, or the export and "
            "the checkpoint come from different logs)"
        )
    summary = (
        f"OK: {cp.size} entries, root {base64.b64encode(cp.root).decode()}, "
        f"checkpoint signed by {key.name}"
    )
    if count > cp.size:
        summary += (
            f"\nnote: entries {cp.size}..{count - 1} are well-formed but not covered by "
            "this checkpoint"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Verify an exported Tether audit log against a signed checkpoint."
    )
    parser.add_argument("--log", required=True, type=Path, help="export.jsonl (one entry a line)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="signed checkpoint note")
    parser.add_argument(
        "--key", required=True, help="the log's verifier key text, or @FILE holding it"
    )
    parser.add_argument("--origin", help="require this checkpoint origin")
    parser.add_argument("--bodies", type=Path, help="directory of bodies named by SHA-256 hex")
    args = parser.parse_args(argv)
    try:
        key_text: str = args.key
        if key_text.startswith("@"):
            key_text = _read_text(Path(key_text[1:]))
        key = parse_vkey(key_text)
        note = _read_text(args.checkpoint)
        if not args.log.is_file():
            raise Unusable(f"cannot read {args.log}")
        if args.bodies is not None and not args.bodies.is_dir():
            raise Unusable(f"--bodies {args.bodies} is not a directory")
        print(verify(args.log, note, key, args.origin, args.bodies))
    except Invalid as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except Unusable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Invalid(f"{path} is not valid UTF-8") from e
    except OSError as e:
        raise Unusable(f"cannot read {path}: {e.strerror}") from e


if __name__ == "__main__":
    raise SystemExit(main())
