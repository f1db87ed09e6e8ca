"""RFC 8785 canonical JSON: where the orjson fast path is used, it equals the rfc8785 reference."""

from __future__ import annotations

import enum
import json
import math
import random
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import orjson
import pytest
import rfc8785

from tether.audit import canonical
from tether.audit.canonical import canonical_json, is_canonical, parse_canonical
from tether.errors import BadRequest

SAFE = 2**53 - 1


# --- RFC 8785's own examples ---


def test_rfc8785_section_3_2_2_example() -> None:
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        '"string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        '"literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    assert canonical_json(json.loads(text)) == expected


def test_rfc8785_section_3_2_3_key_order_example() -> None:
    # The grinning face is a surrogate pair in UTF-16, so it sorts before U+FB33.
    obj = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonical_json(obj)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    # Code-point order (orjson's) would put the emoji last: the fast path must not be taken.
    assert list(json.loads(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)))[-1] == "\U0001f600"


# --- the fast path's claims, checked exhaustively where that is cheap ---


def test_every_code_point_escapes_identically_in_orjson_and_rfc8785() -> None:
    code_points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for i in range(0, len(code_points), 4096):
        chunk = code_points[i : i + 4096]
        # One string per code point inside a list, so a difference cannot hide in a neighbour.
        strings = [chr(c) for c in chunk]
        assert orjson.dumps(strings) == rfc8785.dumps(strings), hex(chunk[0])


def test_bmp_keys_sort_the_same_by_code_point_and_by_utf16() -> None:
    rng = random.Random(8785)
    bmp = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(200):
        keys = {"".join(chr(rng.choice(bmp)) for _ in range(rng.randint(0, 3))) for _ in range(50)}
        obj = dict.fromkeys(keys, 0)
        fast = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        assert fast == rfc8785.dumps(obj)
        assert canonical_json(obj) == fast


def test_integers_at_the_i_json_limits() -> None:
    for n in (0, 1, -1, SAFE, -SAFE, 10**15, -(10**15)):
        assert canonical_json(n) == str(n).encode() == rfc8785.dumps(n)
        assert canonical_json({"n": [n]}) == rfc8785.dumps({"n": [n]})
    for n in (SAFE + 1, -SAFE - 1, 2**63, 2**64, -(2**70)):
        with pytest.raises(BadRequest, match="cannot be canonical"):
            canonical_json(n)
        with pytest.raises(BadRequest):
            canonical_json({"deep": [{"n": n}]})


# --- a generated corpus: everything must equal the reference ---

_ALPHABET = (
    [chr(c) for c in range(0x20)]  # control characters
    + list('"\\/ abcXYZ019')  # escapes and plain ASCII
    + ["\x7f", "\u0080", "\u00e9", "\u2028", "\u2029", "\u20ac", "\ud7ff", "\ue000", "\ufb33"]
    + ["\ufeff", "\ufffd", "\uffff", "\U00010000", "\U0001f600", "\U0010ffff"]
)


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 6)))


def _float(rng: random.Random) -> float:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.uniform(-1e6, 1e6)
    if kind == 1:
        return rng.choice(
            [0.0, -0.0, 1.0, 0.5, 1e21, 1e20, 1e-6, 1e-7, 5e-324, 1.7976931348623157e308]
        )
    if kind == 2:
        return float(rng.randint(-(10**18), 10**18))
    if kind == 3:
        return rng.random() * 10.0 ** rng.randint(-30, 30)
    return math.ldexp(rng.random(), rng.randint(-1074, 1023)) * rng.choice([1, -1])


def _int(rng: random.Random) -> int:
    return rng.choice([rng.randint(-1000, 1000), rng.randint(-SAFE, SAFE), SAFE, -SAFE])


def _value(rng: random.Random, depth: int, floats: bool) -> Any:
    kinds = ["str", "int", "bool", "none"] + (["float"] if floats else [])
    if depth < 4:
        kinds += ["dict", "dict", "list"]
    kind = rng.choice(kinds)
    if kind == "str":
        return _text(rng)
    if kind == "int":
        return _int(rng)
    if kind == "float":
        return _float(rng)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        items = [_value(rng, depth + 1, floats) for _ in range(rng.randint(0, 4))]
        return tuple(items) if rng.random() < 0.2 else items
    return {_text(rng): _value(rng, depth + 1, floats) for _ in range(rng.randint(0, 5))}


@pytest.mark.parametrize("floats", [False, True], ids=["ints-only", "with-floats"])
def test_generated_corpus_equals_the_reference(floats: bool) -> None:
    rng = random.Random(20240601 + floats)
    fast_taken = 0
    for _ in range(3000):
        obj = _value(rng, 0, floats)
        expected = rfc8785.dumps(obj)
        assert canonical_json(obj) == expected, obj
        if canonical._fast_path_equals_jcs(obj):
            fast_taken += 1
            # The claim itself: where the fast path is allowed, orjson alone is JCS.
            assert orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) == expected, obj
        assert is_canonical(expected)
    assert fast_taken > 300  # the corpus exercises the fast path, not only the fallback


def test_fast_path_does_not_call_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(obj: Any) -> bytes:
        raise AssertionError("fallback used")

    monkeypatch.setattr(rfc8785, "dumps", refuse)
    event = {
        "index": 7,
        "type": "llm.invoke",
        "actor": "spiffe://example.org/agent/b\u00f6b",
        "data": {"tokens": 1234, "args": ["q", None, True, {"n": -5}]},
        "bodies": {"prompt": "ab" * 32},
    }
    assert canonical_json(event) == json.dumps(
        event, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def test_scalars_and_literals() -> None:
    assert canonical_json(None) == b"null"
    assert canonical_json(True) == b"true"
    assert canonical_json(False) == b"false"
    assert canonical_json([True, False, None, 1]) == b"[true,false,null,1]"
    assert canonical_json({"b": False, "a": True}) == b'{"a":true,"b":false}'
    assert canonical_json("") == b'""'
    assert canonical_json({}) == b"{}"
    assert canonical_json(()) == b"[]"


def test_other_mapping_and_subclass_types_take_the_reference_path() -> None:
    class Color(enum.IntEnum):
        RED = 3

    class Name(enum.StrEnum):
        ALICE = "alice"

    obj = {"a": MappingProxyType({"z": 1, "y": [Color.RED]}), "b": OrderedDict(x=Name.ALICE)}
    assert canonical_json(obj) == b'{"a":{"y":[3],"z":1},"b":{"x":"alice"}}'


BOGUS_VALUES: dict[str, Any] = {
    "nan": math.nan,
    "inf": math.inf,
    "minus-inf": -math.inf,
    "nested-nan": {"x": [1.0, math.nan]},
    "int-key": {1: "int key"},
    "none-key": {None: "null key"},
    "tuple-key": {("a",): "tuple key"},
    "lone-surrogate": "\ud800 lone surrogate",
    "lone-surrogate-key": {"\udfff": 1},
    "set": {1, 2},
    "bytes": b"bytes",
    "object": object(),
}


@pytest.mark.parametrize("name", sorted(BOGUS_VALUES))
def test_values_jcs_cannot_represent_are_refused(name: str) -> None:
    with pytest.raises(BadRequest):
        canonical_json(BOGUS_VALUES[name])


# --- verifiers' helpers ---


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1, "b":2}',  # whitespace
        b'{"b":1,"a":2}',  # unsorted
        b'{"a":1,"a":1}',  # duplicate key
        b'{"a":1.0}',  # non-canonical number
        b'{"a":1e2}',
        b'{"a":-0}',
        b'{"a":"\\u0041"}',  # needless escape
        b'{"a":"\\u001F"}',  # uppercase hex escape
        b'{"a":"\\/"}',
        b'{"a":1}\n',  # trailing newline
        b'{"a":"\xff"}',  # invalid UTF-8
        b'{"a":9007199254740993}',  # no double has this value
        b"NaN",
        b"",
    ],
)
def test_non_canonical_bytes_are_detected(data: bytes) -> None:
    assert not is_canonical(data)
    with pytest.raises(BadRequest):
        parse_canonical(data)


def test_large_floats_in_integer_form_are_canonical() -> None:
    # JCS writes 1e20 without an exponent; reading it back must give the same float.
    assert canonical_json(1e20) == b"100000000000000000000"
    assert parse_canonical(b"[100000000000000000000]") == [1e20]
    assert not is_canonical(b"9007199254740993")  # no double has this value


def test_parse_canonical_returns_the_value() -> None:
    data = canonical_json({"index": 3, "s": "\u20ac\n", "f": 0.5})
    assert parse_canonical(data) == {"index": 3, "s": "\u20ac\n", "f": 0.5}
    assert is_canonical(data)
