"""``tether policy validate | test | explain`` against a real data dir (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tether.cli.policy import policy_app

TD = "example.org"
BOT = f"spiffe://{TD}/agent/bot"
ALICE = f"spiffe://{TD}/user/alice"
FIXTURES = Path(__file__).parent / "fixtures" / "bad_policies"

SWARM = """\
// schema changes by the swarm need two SREs
@escalate("2 of group:sre")
@reason("schema changes by the swarm need two SREs")
permit (principal in Tether::Group::"swarm", action == Tether::Action::"tool.call", resource)
when { context.granted && context has effects && context.effects.contains("db.schema_change") };

@reason("no generation over 4000 tokens")
forbid (principal, action == Tether::Action::"llm.invoke", resource)
when { context has max_tokens && context.max_tokens > 4000 };
"""

CASES = f"""\
[defaults]
principal = "{BOT}"
chain = ["{ALICE}"]
grants = ["model:gpt-4o*", "tool:db.*"]

[[case]]
name = "a granted model is allowed"
action = "llm.invoke"
resource = "gpt-4o"
expect = "allow"
policies = ["tether.grants"]

[[case]]
name = "long generations are refused"
action = "llm.invoke"
resource = "gpt-4o"
context = {{ max_tokens = 9000 }}
expect = "deny"
reason = "no generation over 4000"

[[case]]
name = "the swarm escalates schema changes"
action = "tool.call"
resource = "db.migrate"
groups = ["swarm"]
effects = {{ "db.schema_change" = 1 }}
expect = "escalate"
quorum = "2 of group:sre"
policies = ["10-swarm.cedar:2"]

[[case]]
name = "ungranted tools are denied"
action = "tool.call"
resource = "shell.exec"
expect = "deny"
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "10-swarm.cedar").write_text(SWARM)
    return root


runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(policy_app, list(args))
    return res.exit_code, res.output


def test_validate_ok(home: Path) -> None:
    code, out = invoke("validate", "--data-dir", str(home))
    assert code == 0, out
    assert "ok: 5 policies from 2 file(s)" in out
    assert "10-swarm.cedar" in out


def test_validate_names_file_and_line(home: Path) -> None:
    (home / "policies" / "20-typo.cedar").write_text(
        '\n@escalte("1 of human")\npermit (principal, action, resource);\n'
    )
    code, out = invoke("validate", "--data-dir", str(home))
    assert code == 1
    assert f"{home / 'policies' / '20-typo.cedar'}:2: unknown annotation @escalte" in out


@pytest.mark.parametrize("name", ["syntax_error", "unknown_attribute", "duplicate_id"])
def test_validate_given_files(name: str) -> None:
    path = FIXTURES / f"{name}.cedar"
    line = int(path.read_text().splitlines()[0].rpartition(" ")[2])
    code, out = invoke("validate", str(path))
    assert code == 1
    assert f"{path}:{line}: " in out


def test_validate_json(home: Path) -> None:
    code, out = invoke("validate", "--data-dir", str(home), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] and len(doc["version"]) == 64
    assert [p["id"] for p in doc["policies"]][-2:] == ["10-swarm.cedar:2", "10-swarm.cedar:7"]


def test_policy_test_passes_and_fails(home: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.toml"
    cases.write_text(CASES)
    code, out = invoke("test", str(cases), "--data-dir", str(home))
    assert code == 0, out
    assert "4 passed, 0 failed" in out
    cases.write_text(CASES.replace('expect = "escalate"', 'expect = "allow"'))
    code, out = invoke("test", str(cases), "--data-dir", str(home), "--json")
    assert code == 1
    doc = json.loads(out)
    assert (doc["passed"], doc["failed"]) == (3, 1)
    bad = next(c for c in doc["cases"] if not c["passed"])
    assert bad["name"] == "the swarm escalates schema changes"
    assert bad["failures"] == ["expected allow, got escalate"]


def test_policy_test_refuses_a_malformed_case(home: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.toml"
    cases.write_text(f'[[case]]\nprincipal = "{BOT}"\naction = "llm.invoke"\nresource = "m"\n')
    code, out = invoke("test", str(cases), "--data-dir", str(home))
    assert code == 1 and "case 1" in out and "expect is required" in out
    cases.write_text(CASES.replace('resource = "shell.exec"', 'resource = "x"\nexpct = "deny"'))
    code, out = invoke("test", str(cases), "--data-dir", str(home))
    assert code == 1 and "unknown keys expct" in out


def test_policy_test_with_an_invalid_policy_set(home: Path, tmp_path: Path) -> None:
    (home / "policies" / "30-bad.cedar").write_text("forbid (principal, action, resource")
    cases = tmp_path / "cases.toml"
    cases.write_text(CASES)
    code, out = invoke("test", str(cases), "--data-dir", str(home))
    assert code == 1 and "30-bad.cedar:1" in out


def test_explain_table_and_json(home: Path) -> None:
    args = [
        "explain",
        "--data-dir",
        str(home),
        "--principal",
        BOT,
        "--chain",
        ALICE,
        "--action",
        "tool.call",
        "--resource",
        "db.migrate",
        "--group",
        "swarm",
        "--grant",
        "tool:db.*",
        "--effect",
        "db.schema_change",
    ]
    code, out = invoke(*args)
    assert code == 0, out
    assert "verdict: escalate" in out and "quorum: 2 of group:sre" in out
    assert "10-swarm.cedar:2" in out and "tether.grants" in out
    code, out = invoke(*args, "--json", "--context", "max_tokens=10", "--context", "other=x")
    doc = json.loads(out)
    assert doc["verdict"]["outcome"] == "escalate"
    assert {s["id"] for s in doc["satisfied"]} == {"tether.grants", "10-swarm.cedar:2"}
    assert doc["request"]["context"]["max_tokens"] == 10
    assert "other" not in doc["request"]["context"]


def test_explain_default_deny(home: Path) -> None:
    code, out = invoke(
        "explain",
        "--data-dir",
        str(home),
        "--principal",
        BOT,
        "--action",
        "llm.invoke",
        "--resource",
        "gpt-4o",
    )
    assert code == 0
    assert "verdict: deny" in out and "no policy is satisfied (default deny)" in out


def test_explain_rejects_bad_input(home: Path) -> None:
    code, out = invoke(
        "explain", "--data-dir", str(home), "--principal", "bob", "--action", "llm.invoke",
        "--resource", "m",
    )  # fmt: skip
    assert code == 1 and "error:" in out
    code, out = invoke(
        "explain", "--data-dir", str(home), "--principal", BOT, "--action", "db.drop",
        "--resource", "m",
    )  # fmt: skip
    assert code == 1 and "unknown action" in out
