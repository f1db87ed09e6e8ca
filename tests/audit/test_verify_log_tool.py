"""tools/verify_log.py: the auditor's standalone verifier, run as a subprocess on real exports."""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import json
import math
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit.canonical import canonical_json
from tether.audit.merkle import TreeBuilder, leaf_hash, root_from_leaves
from tether.audit.note import Checkpoint, NoteSigner, sign_checkpoint

TOOL = Path(__file__).parents[2] / "tools" / "verify_log.py"
ASSETS = Path(__file__).parent / "assets"
ORIGIN = "tether.test/log"
SIZE = 25


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_log_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["verify_log_tool"] = module
    spec.loader.exec_module(module)
    return module


tool = load_tool()


@dataclass
class Export:
    log: Path
    checkpoint: Path
    bodies: Path
    vkey: str
    lines: list[bytes]

    def run(self, *extra: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        args = ["--log", str(self.log), "--checkpoint", str(self.checkpoint)]
        return run_tool(*args, "--key", key if key is not None else self.vkey, *extra)

    def write_lines(self, lines: list[bytes]) -> None:
        self.log.write_bytes(b"".join(line + b"\n" for line in lines))


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_entry(i: int, bodies: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": i,
        "type": "llm.invoke" if i % 2 else "identity.issued",
        "actor": f"spiffe://example.org/agent/a{i}",
        "session": None,
        "decision": "allow",
        "data": {
            "tokens": 1000 + i,
            "cost": 0.25 * i,
            "note": 'caf\u00e9 \u20ac \U0001f600\n\t"quoted"',
            "\U0001f600 emoji key": True,
            "\ufb33": [i, -i, None],
        },
    }
    if bodies:
        entry["bodies"] = bodies
    return entry


@pytest.fixture
def export(tmp_path: Path) -> Export:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    body_dir = tmp_path / "bodies"
    body_dir.mkdir()
    tree = TreeBuilder()
    lines = []
    for i in range(SIZE):
        bodies = {}
        if i % 5 == 0:
            for name in ("prompt", "response"):
                content = f"{name} of entry {i}".encode()
                digest = hashlib.sha256(content).hexdigest()
                (body_dir / digest).write_bytes(content)
                bodies[name] = digest
        line = canonical_json(make_entry(i, bodies))
        tree.append(leaf_hash(line))
        lines.append(line)
    log = tmp_path / "export.jsonl"
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    checkpoint = tmp_path / "checkpoint.txt"
    checkpoint.write_text(sign_checkpoint(Checkpoint(ORIGIN, SIZE, tree.root()), signer))
    return Export(log, checkpoint, body_dir, signer.verifier_key, lines)


def root_b64(lines: list[bytes]) -> str:
    return base64.b64encode(root_from_leaves([leaf_hash(x) for x in lines])).decode()


# --- the happy paths ---


def test_a_genuine_export_verifies(export: Export) -> None:
    result = export.run("--origin", ORIGIN, "--bodies", str(export.bodies))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"OK: {SIZE} entries, root {root_b64(export.lines)}, checkpoint signed by {ORIGIN}\n"
    )


def test_key_can_be_read_from_a_file(export: Export, tmp_path: Path) -> None:
    key_file = tmp_path / "log.vkey"
    key_file.write_text(export.vkey + "\n")
    result = export.run(key=f"@{key_file}")
    assert result.returncode == 0, result.stderr


def test_entries_beyond_the_checkpoint_are_reported_not_trusted(export: Export) -> None:
    extra = canonical_json(make_entry(SIZE, {}))
    export.write_lines([*export.lines, extra])
    result = export.run()
    assert result.returncode == 0, result.stderr
    assert f"entries {SIZE}..{SIZE} are well-formed but not covered" in result.stdout


def test_an_empty_log_verifies_against_a_size_zero_checkpoint(tmp_path: Path) -> None:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    (tmp_path / "log.jsonl").write_bytes(b"")
    (tmp_path / "cp.txt").write_text(
        sign_checkpoint(Checkpoint(ORIGIN, 0, hashlib.sha256(b"").digest()), signer)
    )
    result = run_tool(
        "--log",
        str(tmp_path / "log.jsonl"),
        "--checkpoint",
        str(tmp_path / "cp.txt"),
        "--key",
        signer.verifier_key,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: 0 entries")


# --- tampering: each is caught and names the first bad entry ---


def _fails(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert message in result.stderr, result.stderr


def test_an_edited_entry_breaks_the_root(export: Export) -> None:
    lines = list(export.lines)
    lines[17] = lines[17].replace(b'"decision":"allow"', b'"decision":"deny"')
    export.write_lines(lines)
    _fails(export.run(), "root mismatch")


def test_a_non_canonical_entry_is_named(export: Export) -> None:
    lines = list(export.lines)
    lines[17] = json.dumps(json.loads(lines[17])).encode()  # same value, default separators
    export.write_lines(lines)
    _fails(export.run(), "entry 17: not in RFC 8785 canonical form")


def test_a_deleted_entry_is_named(export: Export) -> None:
    export.write_lines(export.lines[:7] + export.lines[8:])
    _fails(export.run(), "entry 7: index is 8, expected 7")


def test_swapped_entries_are_named(export: Export) -> None:
    lines = list(export.lines)
    lines[3], lines[4] = lines[4], lines[3]
    export.write_lines(lines)
    _fails(export.run(), "entry 3: index is 4, expected 3")


def test_a_truncated_file_is_caught(export: Export) -> None:
    data = export.log.read_bytes()
    export.log.write_bytes(data[:-10])
    _fails(export.run(), f"entry {SIZE - 1}: line does not end with a newline")


def test_missing_trailing_entries_are_caught(export: Export) -> None:
    export.write_lines(export.lines[:-2])
    _fails(export.run(), f"entry {SIZE - 2}: missing")


def test_a_checkpoint_from_another_key_is_refused(export: Export) -> None:
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    _fails(export.run(key=other.verifier_key), f"checkpoint: not signed by {ORIGIN}+")


def test_a_checkpoint_for_another_origin_is_refused(export: Export) -> None:
    _fails(export.run("--origin", "tether.test/elsewhere"), "origin is 'tether.test/log'")


def test_a_missing_body_is_named(export: Export) -> None:
    digest = json.loads(export.lines[10])["bodies"]["response"]
    (export.bodies / digest).unlink()
    _fails(export.run("--bodies", str(export.bodies)), "entry 10: body 'response'")


def test_an_altered_body_is_named(export: Export) -> None:
    digest = json.loads(export.lines[5])["bodies"]["prompt"]
    (export.bodies / digest).write_bytes(b"something else")
    _fails(export.run("--bodies", str(export.bodies)), "entry 5: body 'prompt' does not hash")


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("bogus-checkpoint-bad-signature.txt", "invalid signature"),
        ("bogus-checkpoint-malformed-size.txt", "tree size"),
        ("bogus-checkpoint-no-signature.txt", "no signature lines"),
        ("bogus-checkpoint-other-key.txt", "not signed by tether.test/log+"),
        ("bogus-checkpoint-short-root.txt", "32 bytes"),
        ("bogus-note-too-many-signatures.txt", "more than 100 signatures"),
    ],
)
def test_bogus_checkpoint_fixtures_are_refused(export: Export, fixture: str, message: str) -> None:
    result = run_tool(
        "--log",
        str(export.log),
        "--checkpoint",
        str(ASSETS / fixture),
        "--key",
        f"@{ASSETS / 'test-log.vkey'}",
    )
    _fails(result, message)


def test_wrong_origin_fixture_is_refused_with_origin(export: Export) -> None:
    result = run_tool(
        "--log",
        str(export.log),
        "--checkpoint",
        str(ASSETS / "bogus-checkpoint-wrong-origin.txt"),
        "--key",
        f"@{ASSETS / 'test-log.vkey'}",
        "--origin",
        ORIGIN,
    )
    _fails(result, "origin is 'tether.test/other-log'")


@pytest.mark.parametrize("key", ["", "nonsense", "tether.test/log+00000000+AAAA"])
def test_an_unusable_key_exits_2(export: Export, key: str) -> None:
    result = export.run(key=key)
    assert result.returncode == 2
    assert "error: --key" in result.stderr


def test_an_unreadable_log_exits_2(export: Export, tmp_path: Path) -> None:
    result = run_tool(
        "--log",
        str(tmp_path / "nope"),
        "--checkpoint",
        str(export.checkpoint),
        "--key",
        export.vkey,
    )
    assert result.returncode == 2


# --- the tool is standalone, and its pieces agree with Tether's ---


def test_tool_imports_only_the_standard_library_and_cryptography() -> None:
    tree = ast.parse(TOOL.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"cryptography"}


def test_tool_tree_head_matches_the_merkle_module() -> None:
    for n in range(70):
        head = tool.TreeHead()
        data = [f"leaf {i}".encode() for i in range(n)]
        for d in data:
            head.add(d)
        assert head.root() == root_from_leaves([leaf_hash(d) for d in data])


def _random_values(rng: random.Random) -> Iterator[Any]:
    alphabet = [chr(c) for c in range(0x20)] + list('"\\/aZ09 \x7f\u00e9\u2028\ue000\uffff')
    alphabet += ["\U00010000", "\U0001f600"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))

    def value(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 3 else 5)
        if kind == 0:
            return text()
        if kind == 1:
            return rng.randint(-(2**53) + 1, 2**53 - 1)
        if kind == 2:
            return rng.choice([rng.uniform(-1e9, 1e9), rng.random() * 10.0 ** rng.randint(-40, 40)])
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return float(rng.randint(-(10**25), 10**25))
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 4))}

    while True:
        yield value(0)


def test_tool_jcs_equals_the_reference_on_a_generated_corpus() -> None:
    values = _random_values(random.Random(4242))
    for _ in range(3000):
        obj = next(values)
        expected = rfc8785.dumps(obj)
        assert tool.check_canonical(expected) is not None or expected == b"null"
        assert tool.jcs(tool.parse_json(expected)).encode() == expected


def test_tool_string_escapes_match_jcs_for_every_code_point() -> None:
    # orjson's escaping is checked against rfc8785 code point by code point in test_canonical.
    # Escaping is per character, so 256 code points to a string lose nothing and save time.
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    strings = ["".join(chars[i : i + 256]) for i in range(0, len(chars), 256)]
    assert tool.jcs(strings).encode() == orjson.dumps(strings)


def test_tool_number_form_matches_the_reference() -> None:
    rng = random.Random(99)
    for _ in range(20000):
        x = math.ldexp(rng.random(), rng.randint(-1074, 1023)) * rng.choice([1, -1])
        assert tool.jcs_number(x) == rfc8785.dumps(x).decode()
    for x in (1e21, 1e20, 1e-6, 1e-7, 5e-324, 1.7976931348623157e308, -0.0, 100.0):
        assert tool.jcs_number(x) == rfc8785.dumps(x).decode()


@pytest.mark.parametrize(
    "line",
    [
        b'{"index":0,"a":1}',  # unsorted
        b'{"a":1,"a":1,"index":0}',  # duplicate key
        b'{"index":0,"x":NaN}',
        b'{"index":0,"x":"\\ud800"}',  # lone surrogate
        b'{"index":0,"x":1.50}',
        b'{"index": 0}',
        b'{"index":0,"x":"\xc3"}',  # truncated UTF-8
        b"[0]",
    ],
)
def test_tool_refuses_non_canonical_or_non_i_json_lines(line: bytes) -> None:
    with pytest.raises(tool.Invalid):
        value = tool.check_canonical(line)
        if not isinstance(value, dict):
            raise tool.Invalid("not an object")
