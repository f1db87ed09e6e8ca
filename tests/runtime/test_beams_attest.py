"""The objective attestation and the base filesystem digest it covers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tether.audit.canonical import canonical_json
from tether.errors import BadRequest
from tether.runtime.attest import (
    BaseFsDigest,
    attestation_digest,
    build_attestation,
    tool_digest,
)

SEARCH = {"name": "search", "description": "web search", "inputSchema": {"type": "object"}}


def _doc(**kw: object) -> dict[str, object]:
    args: dict[str, object] = {
        "beam_id": "b-000000000001",
        "objective": "find the flaky test",
        "grants": ["model:gpt-4o-mini"],
        "argv": ["python", "agent.py"],
        "base_fs": "ab" * 32,
        "tools": [SEARCH],
    }
    args.update(kw)
    return build_attestation(**args)  # type: ignore[arg-type]


def test_the_digest_is_sha256_of_canonical_json_and_covers_every_part() -> None:
    doc = _doc()
    digest = attestation_digest(doc)
    assert digest == hashlib.sha256(canonical_json(doc)).hexdigest()
    assert doc["tools"] == [tool_digest(SEARCH)]
    for change in (
        {"objective": "something else"},
        {"grants": ["model:*"]},
        {"argv": ["python", "other.py"]},
        {"base_fs": "cd" * 32},
        {"tools": []},
        {"tools": [{**SEARCH, "description": "exfiltrate"}]},
        {"beam_id": "b-000000000002"},
    ):
        assert attestation_digest(_doc(**change)) != digest, change
    # tool order does not matter, their content does
    other = {"name": "fetch", "inputSchema": {}}
    assert attestation_digest(_doc(tools=[SEARCH, other])) == attestation_digest(
        _doc(tools=[other, SEARCH])
    )


def test_secrets_in_the_command_are_redacted_before_hashing() -> None:
    key = "sk-" + "a1b2c3d4" * 6
    doc = _doc(argv=["agent", "--api-key", key])
    assert key not in json.dumps(doc)
    # what the log stores re-hashes to the same digest (redaction is idempotent)
    from tether.audit.redact import redact

    assert attestation_digest(redact(doc)) == attestation_digest(doc)


def test_an_attestation_too_large_for_a_token_is_refused() -> None:
    with pytest.raises(BadRequest, match="attestation"):
        _doc(argv=["x"] + ["y" * 100] * 200)


def _tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "bin" / "python").write_text("interp")
    (root / "lib" / "pkg" / "mod.py").write_text("x = 1")


def test_base_fs_digest_changes_with_what_is_installed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    d1 = BaseFsDigest([str(root)], cache_dir=tmp_path / "c1").get()
    assert len(d1) == 64
    assert BaseFsDigest([str(root)], cache_dir=tmp_path / "c2").get() == d1  # deterministic
    # compiled bytecode is derived: writing it changes nothing
    (root / "lib" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert BaseFsDigest([str(root)], cache_dir=tmp_path / "c3").get() == d1
    # a new file deep inside does
    (root / "lib" / "pkg" / "new.py").write_text("y = 2")
    assert BaseFsDigest([str(root)], cache_dir=tmp_path / "c4").get() != d1


def test_base_fs_digest_is_cached_and_recomputed_when_a_root_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    cache = tmp_path / "cache"
    digest = BaseFsDigest([str(root)], cache_dir=cache)
    first = digest.get()
    [cache_file] = list(cache.iterdir())
    assert json.loads(cache_file.read_text())["digest"] == first
    # another process (another BaseFsDigest) reads the cache instead of walking
    doc = json.loads(cache_file.read_text())
    doc["digest"] = "f" * 64
    cache_file.write_text(json.dumps(doc))
    assert BaseFsDigest([str(root)], cache_dir=cache).get() == "f" * 64
    # installing into a root moves its mtime: the stale cache is not used
    (root / "etc").mkdir()
    os.utime(root, ns=(1, 1))
    fresh = BaseFsDigest([str(root)], cache_dir=cache).get()
    assert fresh not in (first, "f" * 64)
