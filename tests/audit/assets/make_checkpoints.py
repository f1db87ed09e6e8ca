"""Regenerates the checkpoint fixtures in this directory (deterministic: Ed25519 signs the same).

    .venv/bin/python tests/audit/assets/make_checkpoints.py

The keys come from fixed, public seeds: they are test keys and protect nothing.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit.note import Checkpoint, NoteSigner, sign_checkpoint

HERE = Path(__file__).parent
ORIGIN = "tether.test/log"
LOG_SEED = hashlib.sha256(b"tether test log key").digest()
OTHER_SEED = hashlib.sha256(b"tether test other key").digest()
ROOT = hashlib.sha256(b"tether test root").digest()


def log_signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(LOG_SEED))


def other_signer() -> NoteSigner:
    # Same name, different key: a verifier must treat it as unknown, not as the log.
    return NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(OTHER_SEED))


def main() -> None:
    log = log_signer()
    good = sign_checkpoint(Checkpoint(ORIGIN, 42, ROOT), log)
    files = {
        "good-checkpoint.txt": good,
        "test-log.vkey": log.verifier_key + "\n",
        # The body was edited after signing.
        "bogus-checkpoint-bad-signature.txt": good.replace("\n42\n", "\n43\n", 1),
        # Signed by the log's key, but for another origin.
        "bogus-checkpoint-wrong-origin.txt": sign_checkpoint(
            Checkpoint("tether.test/other-log", 42, ROOT), log
        ),
        # Validly signed text whose size has a leading zero.
        "bogus-checkpoint-malformed-size.txt": log.sign(
            Checkpoint(ORIGIN, 42, ROOT).to_text().replace("\n42\n", "\n042\n")
        ),
        # The checkpoint text and its blank line, with the signature lines cut off.
        "bogus-checkpoint-no-signature.txt": good[: good.index("\n\n") + 2],
        # Signed by another key under the log's name.
        "bogus-checkpoint-other-key.txt": sign_checkpoint(
            Checkpoint(ORIGIN, 42, ROOT), other_signer()
        ),
        # Validly signed text whose root hash is 31 bytes.
        "bogus-checkpoint-short-root.txt": log.sign(
            f"{ORIGIN}\n42\n{base64.b64encode(ROOT[:31]).decode()}\n"
        ),
        # A valid signature buried under more signature lines than a verifier reads.
        "bogus-note-too-many-signatures.txt": good
        + "".join(
            good.splitlines(keepends=True)[-1].replace(ORIGIN, f"witness{i}.example")
            for i in range(100)
        ),
    }
    for name, content in files.items():
        (HERE / name).write_text(content, encoding="utf-8")


if __name__ == "__main__":
    main()
