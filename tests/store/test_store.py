from pathlib import Path

import pytest

from tether.errors import BadRequest
from tether.store import Store


def test_revocations_are_seen_by_a_second_store_on_the_same_file(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "t.db"), Store(tmp_path / "t.db")
    rev = a.add_revocation("agent", "spiffe://td/agent/x", 123, "why", None)
    assert [r.value for r in b.revocations_since(0)] == ["spiffe://td/agent/x"]
    assert b.revocations_since(rev.seq) == []
    a.close()
    b.close()


def test_user_credentials_are_stored_hashed(tmp_path: Path) -> None:
    s = Store(tmp_path / "t.db")
    s.add_user("alice", "tether_uc_secret-value", ["model:*"], 1)
    assert s.check_user_credential("tether_uc_secret-value").name == "alice"  # type: ignore[union-attr]
    assert s.check_user_credential("tether_uc_other") is None
    assert b"tether_uc_secret-value" not in (tmp_path / "t.db").read_bytes()
    with pytest.raises(BadRequest):
        s.add_user("alice", "x", [], 1)
    s.close()


def test_identities_are_recorded_once(tmp_path: Path) -> None:
    s = Store(tmp_path / "t.db")
    for _ in range(3):
        s.ensure_identity("spiffe://td/agent/x", "agent", "x", 5, "spiffe://td/user/a")
    assert [(i.name, i.created_by) for i in s.list_identities()] == [("x", "spiffe://td/user/a")]
    s.close()
