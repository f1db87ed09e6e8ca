"""C2SP signed notes and tlog checkpoints: interop vectors, round trips and every bogus fixture."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit.note import (
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    key_id,
    parse_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from tether.errors import BadRequest, VerificationFailed

ASSETS = Path(__file__).parent / "assets"
ORIGIN = "tether.test/log"

# --- published vectors: golang.org/x/mod/sumdb/note (note_test.go, example_test.go) and the
# --- c2sp.org/signed-note example key. Ed25519 is deterministic, so signing must match bytes.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot "
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)
FOO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
FOO_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


@pytest.fixture
def log_verifier() -> NoteVerifier:
    return NoteVerifier.from_vkey(asset("test-log.vkey"))


def test_go_signer_key_reproduces_the_published_signature() -> None:
    signer = NoteSigner.from_signer_key(PETER_SKEY)
    assert signer.verifier_key == PETER_VKEY
    assert signer.sign(GO_TEXT) == GO_TEXT + "\n" + PETER_SIG
    assert signer.signer_key() == PETER_SKEY


def test_published_notes_verify_and_unknown_cosignatures_are_ignored() -> None:
    note = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert NoteVerifier.from_vkey(PETER_VKEY).verify(note) == GO_TEXT
    assert NoteVerifier.from_vkey(ENOCH_VKEY).verify(note) == GO_TEXT
    assert NoteVerifier.from_vkey(FOO_VKEY).verify(FOO_NOTE) == "This is an example message.\n"


def test_enoch_key_is_the_all_zero_seed() -> None:
    # x/mod's example generates EnochRoot's key from a reader of zero bytes.
    signer = NoteSigner("EnochRoot", Ed25519PrivateKey.from_private_bytes(bytes(32)))
    assert signer.verifier_key == ENOCH_VKEY
    assert signer.sign(GO_TEXT) == GO_TEXT + "\n" + ENOCH_SIG


def test_key_id_is_truncated_sha256_of_name_newline_type_and_key() -> None:
    raw = base64.b64decode(PETER_VKEY.split("+", 2)[2])
    assert key_id("PeterNeumann", raw[1:]).hex() == "c74f20a3"
    assert hashlib.sha256(b"PeterNeumann\n" + raw).digest()[:4].hex() == "c74f20a3"


def test_altered_published_note_is_rejected() -> None:
    note = GO_TEXT + "\n" + PETER_SIG
    with pytest.raises(VerificationFailed, match="invalid signature"):
        NoteVerifier.from_vkey(PETER_VKEY).verify(note.replace("cryptography", "cryptographY"))


def test_sign_and_verify_round_trip_with_a_fresh_key() -> None:
    signer = NoteSigner("example.org/audit", Ed25519PrivateKey.generate())
    verifier = NoteVerifier.from_vkey(signer.verifier_key)
    text = "line one\n\nline three after an empty line\n"
    assert verifier.verify(signer.sign(text)) == text
    assert repr(verifier) == repr(signer).replace("NoteSigner", "NoteVerifier")


def test_signer_never_shows_its_key() -> None:
    signer = NoteSigner.from_signer_key(PETER_SKEY)
    secret = PETER_SKEY.rsplit("+", 1)[1]
    assert secret not in repr(signer) and secret not in str(signer)
    with pytest.raises(BadRequest) as err:
        NoteSigner.from_signer_key(PETER_SKEY[:-4] + "AAA=")
    assert "AYEKFALV" not in str(err.value) and "AYEKFALV" not in err.value.diagnostics()


def test_sign_refuses_text_a_verifier_could_not_read() -> None:
    signer = NoteSigner.from_signer_key(PETER_SKEY)
    with pytest.raises(BadRequest, match="newline"):
        signer.sign("no final newline")
    with pytest.raises(BadRequest, match="control"):
        signer.sign("tab\there\n")
    with pytest.raises(BadRequest):
        NoteSigner("has space", Ed25519PrivateKey.generate())
    with pytest.raises(BadRequest):
        NoteSigner("has+plus", Ed25519PrivateKey.generate())
    with pytest.raises(BadRequest):
        NoteSigner("", Ed25519PrivateKey.generate())


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "PeterNeumann",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong key ID
        "PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # short key ID
        "PeterNeumanm+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # other name
        "PeterNeumann+c74f20a3+AhpcQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # not base64
        "PeterNeumann+c74f20a3+AhpcQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW=",  # type 0x02
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWAA==",  # 34 bytes
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(BadRequest):
        NoteVerifier.from_vkey(vkey)


# --- checkpoints ---


def test_checkpoint_text_round_trip() -> None:
    root = hashlib.sha256(b"x").digest()
    cp = Checkpoint("example.com/log", 20852163, root, ("ext one", "ext two"))
    text = cp.to_text()
    assert (
        text == f"example.com/log\n20852163\n{base64.b64encode(root).decode()}\next one\next two\n"
    )
    assert Checkpoint.parse(text) == cp
    assert parse_checkpoint(text) == cp
    empty = Checkpoint("example.com/log", 0, hashlib.sha256(b"").digest())
    assert empty.to_text().splitlines()[1] == "0"
    assert Checkpoint.parse(empty.to_text()) == empty


def test_good_checkpoint_fixture_verifies(log_verifier: NoteVerifier) -> None:
    cp = verify_checkpoint(asset("good-checkpoint.txt"), log_verifier, ORIGIN)
    assert cp == Checkpoint(ORIGIN, 42, hashlib.sha256(b"tether test root").digest())
    # A checkpoint signed now is byte-identical to the fixture (Ed25519 is deterministic).
    seed = hashlib.sha256(b"tether test log key").digest()
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(seed))
    assert sign_checkpoint(cp, signer) == asset("good-checkpoint.txt")


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("bogus-checkpoint-bad-signature.txt", "invalid signature"),
        ("bogus-checkpoint-wrong-origin.txt", "origin"),
        ("bogus-checkpoint-malformed-size.txt", "tree size"),
        ("bogus-checkpoint-no-signature.txt", "malformed note"),
        ("bogus-checkpoint-other-key.txt", "not signed by tether.test/log"),
        ("bogus-checkpoint-short-root.txt", "32 bytes"),
        ("bogus-note-too-many-signatures.txt", "more than 100 signatures"),
    ],
)
def test_bogus_checkpoints_are_rejected(
    log_verifier: NoteVerifier, fixture: str, message: str
) -> None:
    with pytest.raises(VerificationFailed, match=message):
        verify_checkpoint(asset(fixture), log_verifier, ORIGIN)


def test_wrong_origin_is_only_caught_when_the_origin_is_given(log_verifier: NoteVerifier) -> None:
    cp = verify_checkpoint(asset("bogus-checkpoint-wrong-origin.txt"), log_verifier)
    assert cp.origin == "tether.test/other-log"


@pytest.mark.parametrize(
    "text",
    [
        "origin\n42\n",  # too few lines
        "origin\n42\nroot",  # no final newline
        "\n42\n" + base64.b64encode(bytes(32)).decode() + "\n",  # empty origin
        "o\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "o\n+1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "o\n1 \n" + base64.b64encode(bytes(32)).decode() + "\n",
        "o\n\u0661\n" + base64.b64encode(bytes(32)).decode() + "\n",  # Arabic-Indic digit one
        "o\n" + "9" * 30 + "\n" + base64.b64encode(bytes(32)).decode() + "\n",  # beyond uint64
        "o\n1\n" + base64.b64encode(bytes(33)).decode() + "\n",
        "o\n1\n" + base64.b64encode(bytes(32)).decode().rstrip("=") + "\n",  # no padding
        "o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n",  # non-canonical padding bits
        "o\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n",  # empty extension line
    ],
)
def test_malformed_checkpoint_texts_are_rejected(text: str) -> None:
    with pytest.raises(VerificationFailed, match="malformed checkpoint"):
        Checkpoint.parse(text)


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, bytes(32), ()),
        ("two\nlines", 1, bytes(32), ()),
        ("o", -1, bytes(32), ()),
        ("o", True, bytes(32), ()),
        ("o", 2**64, bytes(32), ()),
        ("o", 1, bytes(31), ()),
        ("o", 1, bytes(32), ("",)),
    ],
)
def test_checkpoint_validates_itself_when_built(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(VerificationFailed, match="malformed checkpoint"):
        Checkpoint(origin, size, root, extensions)


# --- note envelope edge cases (built on the fly from the good fixture) ---


def test_note_envelope_edge_cases(log_verifier: NoteVerifier) -> None:
    good = asset("good-checkpoint.txt")
    sig_line = good.splitlines(keepends=True)[-1]
    body = good[: good.index("\n\n") + 1]

    # Our signature after an unknown one, or duplicated, still verifies.
    other = asset("bogus-checkpoint-other-key.txt").splitlines(keepends=True)[-1]
    assert log_verifier.verify(body + "\n" + other + sig_line) == body
    assert log_verifier.verify(good + sig_line) == body
    # A forged line claiming to be ours rejects the note, even if a valid one follows.
    forged = sig_line.replace(sig_line.split(" ")[2][8:20], "A" * 12)
    with pytest.raises(VerificationFailed):
        log_verifier.verify(body + "\n" + forged + sig_line)
    for bad in [
        good.rstrip("\n"),  # no final newline
        body + "\n" + sig_line.replace("\u2014", "--"),  # not an em dash
        body + "\n" + sig_line.replace(" ", "  ", 1),  # empty name
        body + "\n" + sig_line.replace(ORIGIN, "tether+test"),  # name with plus
        body + "\n" + sig_line[:-10] + "\n",  # truncated base64
        body + "\n\u2014 tether.test/log AAAA\n",  # shorter than a key ID and one byte
        good.replace("42", "4\x012"),  # control character
        body + sig_line,  # no blank line
    ]:
        with pytest.raises(VerificationFailed):
            log_verifier.verify(bad)
