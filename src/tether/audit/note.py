"""C2SP signed notes (Ed25519) and tlog checkpoints: the audit log's signed tree heads.

Formats, byte for byte as in https://c2sp.org/signed-note and https://c2sp.org/tlog-checkpoint
(Go's ``golang.org/x/mod/sumdb/note`` is the reference implementation; its published test
vectors verify here):

* key ID        ``SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]``
* verifier key  ``<name>+<hex8 key ID>+<base64(0x01 || public key)>``
* signer key    ``PRIVATE+KEY+<name>+<hex8 key ID>+<base64(0x01 || seed)>``
* signed note   ``<text ending in \\n>\\n`` then one line per signature:
  ``\u2014 <name> <base64(key ID || 64-byte signature)>\\n``
* checkpoint    the note text ``<origin>\\n<size>\\n<base64(root)>\\n[<extension>\\n]...``

Only signature type 0x01 (Ed25519) is produced or verified. Signatures by keys a verifier does not
know are ignored, as the spec requires, but at least one must be by the verifier's key, and a
signature that claims to be by it and does not verify rejects the whole note.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tether.errors import BadRequest, VerificationFailed

__all__ = [
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteSigner",
    "NoteVerifier",
    "key_id",
    "parse_checkpoint",
    "sign_checkpoint",
    "verify_checkpoint",
]

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
"""More signature lines than this and a note is refused unread (Go's limit; the spec asks >= 16)."""

MAX_TREE_SIZE = 2**64 - 1
SIG_PREFIX = "\u2014 "  # em dash, space

_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # every ASCII control character except newline


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte C2SP key ID of an Ed25519 ``public_key`` (32 raw bytes) under ``name``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def _valid_name(name: str) -> bool:
    # Non-empty, no Unicode space, no '+', and nothing a note may not contain.
    return (
        bool(name)
        and "+" not in name
        and not any(c.isspace() for c in name)
        and not _CONTROL.search(name)
        and _utf8_ok(name)
    )


def _utf8_ok(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _b64decode(text: str, *, canonical: bool = False) -> bytes:
    """Standard padded base64 (RFC 4648 section 4), as Go's ``StdEncoding``; ``ValueError`` if not.

    ``canonical`` also refuses non-zero padding bits, so only one text decodes to each value.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("not base64") from e
    if canonical and base64.b64encode(raw).decode() != text:
        raise ValueError("not canonical base64")
    return raw


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class NoteSigner:
    """Signs notes as ``name`` with an Ed25519 key. Its repr and str never show the key."""

    __slots__ = ("_key", "key_id", "name", "verifier_key")

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        if not _valid_name(name):
            raise BadRequest(
                f"invalid note key name {name!r}",
                hint="a key name is non-empty, with no spaces, '+' or control characters",
            )
        public = _public_bytes(key.public_key())
        self.name = name
        self.key_id = key_id(name, public)
        self.verifier_key = (
            f"{name}+{self.key_id.hex()}+{base64.b64encode(bytes([ALG_ED25519]) + public).decode()}"
        )
        self._key = key

    @classmethod
    def from_signer_key(cls, skey: str) -> NoteSigner:
        """Load a ``PRIVATE+KEY+<name>+<hex8>+<base64(0x01 || seed)>`` signer key."""
        parts = skey.split("+", 4)
        try:
            if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"] or not _HEX8.fullmatch(parts[3]):
                raise ValueError("not a signer key")
            raw = _b64decode(parts[4])
            if len(raw) != 33 or raw[0] != ALG_ED25519:
                raise ValueError("not an Ed25519 signer key")
            signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        except (ValueError, BadRequest) as e:
            # Never echo the text: it is a secret.
            raise BadRequest("malformed note signer key") from e
        if signer.key_id.hex() != parts[3].lower():
            raise BadRequest("note signer key ID does not match its key")
        return signer

    def signer_key(self) -> str:
        """The secret ``PRIVATE+KEY+...`` text (Go ``note.GenerateKey`` format). Keep it secret."""
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        encoded = base64.b64encode(bytes([ALG_ED25519]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{encoded}"

    def sign(self, text: str) -> str:
        """Return the signed note: ``text`` (ending in a newline), a blank line, our signature."""
        if not text.endswith("\n"):
            raise BadRequest("note text must end with a newline")
        if _CONTROL.search(text) or not _utf8_ok(text):
            raise BadRequest("note text must be UTF-8 with no control characters but newline")
        sig = self._key.sign(text.encode())
        blob = base64.b64encode(self.key_id + sig).decode()
        return f"{text}\n{SIG_PREFIX}{self.name} {blob}\n"

    def __repr__(self) -> str:
        return f"NoteSigner({self.name}+{self.key_id.hex()})"

    __str__ = __repr__


class NoteVerifier:
    """Verifies notes signed by one Ed25519 key, known by its verifier key text."""

    __slots__ = ("_key", "key_id", "name", "verifier_key")

    def __init__(self, name: str, key: Ed25519PublicKey) -> None:
        if not _valid_name(name):
            raise BadRequest(f"invalid note key name {name!r}")
        public = _public_bytes(key)
        self.name = name
        self.key_id = key_id(name, public)
        self.verifier_key = (
            f"{name}+{self.key_id.hex()}+{base64.b64encode(bytes([ALG_ED25519]) + public).decode()}"
        )
        self._key = key

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Load ``<name>+<hex8 key ID>+<base64(0x01 || public key)>``; BadRequest if malformed."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or not _HEX8.fullmatch(parts[1]) or not _valid_name(parts[0]):
            raise BadRequest("malformed note verifier key", hint="expected <name>+<hex8>+<base64>")
        name, hex_id, b64 = parts
        try:
            raw = _b64decode(b64)
        except ValueError as e:
            raise BadRequest("malformed note verifier key: bad base64") from e
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise BadRequest("note verifier key is not an Ed25519 (type 0x01) key")
        try:
            public = Ed25519PublicKey.from_public_bytes(raw[1:])
        except ValueError as e:
            raise BadRequest("note verifier key holds an invalid Ed25519 key") from e
        verifier = cls(name, public)
        if verifier.key_id.hex() != hex_id.lower():
            raise BadRequest(f"note verifier key ID {hex_id} does not match key {name}")
        return verifier

    def verify(self, note: str) -> str:
        """Return the note's text if it carries a valid signature by this key, else raise.

        Raises :class:`~tether.errors.VerificationFailed` for a malformed note, more than
        :data:`MAX_SIGNATURES` signature lines, an invalid signature by this key, or none at all.
        """
        if _CONTROL.search(note) or not _utf8_ok(note):
            raise VerificationFailed("malformed note: control characters or invalid UTF-8")
        split = note.rfind("\n\n")
        if split < 0:
            raise VerificationFailed("malformed note: no blank line before the signatures")
        text, block = note[: split + 1], note[split + 2 :]
        if not block.endswith("\n"):
            raise VerificationFailed("malformed note: no signature lines, or no final newline")
        lines = block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise VerificationFailed(f"note has more than {MAX_SIGNATURES} signatures")
        ours: bytes | None = None
        for line in lines:
            if not line.startswith(SIG_PREFIX):
                raise VerificationFailed(
                    "malformed note: a signature line must start with '\u2014 '"
                )
            name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
            try:
                blob = _b64decode(b64)
            except ValueError as e:
                raise VerificationFailed(f"malformed signature by {name[:64]!r}: bad base64") from e
            if not _valid_name(name) or len(blob) < 5:
                raise VerificationFailed(f"malformed signature line for {name[:64]!r}")
            # Unknown keys (other name or other ID) are ignored; the first line of ours decides,
            # as in Go's note.Open, so a duplicate cannot smuggle in a second opinion.
            if name == self.name and blob[:4] == self.key_id and ours is None:
                ours = blob[4:]
        if ours is None:
            raise VerificationFailed(
                f"note is not signed by {self.name}+{self.key_id.hex()}",
                hint="check the verifier key: the note may come from another log or key",
            )
        try:
            self._key.verify(ours, text.encode())
        except InvalidSignature as e:
            raise VerificationFailed(
                f"invalid signature by {self.name}+{self.key_id.hex()}: the note was altered"
            ) from e
        return text

    def __repr__(self) -> str:
        return f"NoteVerifier({self.name}+{self.key_id.hex()})"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A C2SP tlog checkpoint body. Validated when built: an invalid checkpoint cannot exist."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or _CONTROL.search(self.origin):
            raise VerificationFailed("malformed checkpoint: the origin must be one non-empty line")
        if not _utf8_ok(self.origin):
            raise VerificationFailed("malformed checkpoint: the origin is not valid UTF-8")
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise VerificationFailed(f"malformed checkpoint: invalid tree size {self.size!r}")
        if type(self.root_hash) is not bytes or len(self.root_hash) != 32:
            raise VerificationFailed("malformed checkpoint: the root hash must be 32 bytes")
        for ext in self.extensions:
            if not ext or "\n" in ext or _CONTROL.search(ext) or not _utf8_ok(ext):
                raise VerificationFailed("malformed checkpoint: invalid extension line")

    def to_text(self) -> str:
        """The note text: origin, size and base64 root, then any extension lines."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        return "".join(line + "\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly; raise VerificationFailed if it is malformed."""
        if not text.endswith("\n"):
            raise VerificationFailed("malformed checkpoint: text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise VerificationFailed("malformed checkpoint: fewer than three lines")
        origin, size, root, *extensions = lines
        if len(size) > 20 or not _DECIMAL.fullmatch(size):
            raise VerificationFailed(
                f"malformed checkpoint: tree size {size[:40]!r} is not a decimal without "
                "leading zeros"
            )
        try:
            root_hash = _b64decode(root, canonical=True)
        except ValueError as e:
            raise VerificationFailed("malformed checkpoint: root hash is not base64") from e
        return cls(origin, int(size), root_hash, tuple(extensions))


def parse_checkpoint(text: str) -> Checkpoint:
    """Same as :meth:`Checkpoint.parse`."""
    return Checkpoint.parse(text)


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> str:
    """The signed checkpoint note."""
    return signer.sign(cp.to_text())


def verify_checkpoint(note: str, verifier: NoteVerifier, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and return it; also check its origin when ``origin`` is given.

    Pass ``origin`` whenever it is known: a valid signature by the right key on a checkpoint of
    another log (same key, other origin) is still the wrong checkpoint.
    """
    cp = Checkpoint.parse(verifier.verify(note))
    if origin is not None and cp.origin != origin:
        raise VerificationFailed(
            f"checkpoint is for origin {cp.origin!r}, expected {origin!r}",
            hint="this checkpoint comes from another log",
        )
    return cp
