"""The ``[llm]`` table: every kind of bad configuration is refused naming what is wrong, and a
key never ends up anywhere it could be read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tether.errors import ConfigError
from tether.gateways.llm.config import parse_llm_config

OK_PROVIDER = {"kind": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"}

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "key_written_in_config": (
        {"providers": {"p": {**OK_PROVIDER, "api_key": "sk-live-123"}}},
        "never live in config.toml",
    ),
    "unknown_kind": ({"providers": {"p": {"kind": "gemini"}}}, "is not one of"),
    "base_url_not_http": (
        {"providers": {"p": {"kind": "openai-compatible", "base_url": "ftp://x"}}},
        "needs base_url",
    ),
    "provider_not_a_table": ({"providers": {"p": "openai"}}, "must be a table"),
    "key_env_and_file": (
        {"providers": {"p": {**OK_PROVIDER, "api_key_env": "K", "api_key_file": "/k"}}},
        "not both",
    ),
    "key_env_unset": (
        {"providers": {"p": {**OK_PROVIDER, "api_key_env": "TETHER_TEST_UNSET"}}},
        "is not set",
    ),
    "key_file_missing": (
        {"providers": {"p": {**OK_PROVIDER, "api_key_file": "/nonexistent/key"}}},
        "cannot read api_key_file",
    ),
    "route_to_unknown_provider": (
        {"providers": {"p": OK_PROVIDER}, "routes": [{"model": "*", "provider": "q"}]},
        "unknown provider 'q'",
    ),
    "route_without_model": (
        {"providers": {"p": OK_PROVIDER}, "routes": [{"provider": "p"}]},
        "needs model",
    ),
    "negative_price": (
        {
            "providers": {"p": OK_PROVIDER},
            "routes": [{"model": "*", "provider": "p", "usd_per_mtok_in": -1}],
        },
        "non-negative",
    ),
    "price_not_a_number": (
        {
            "providers": {"p": OK_PROVIDER},
            "routes": [{"model": "*", "provider": "p", "usd_per_mtok_out": "cheap"}],
        },
        "not a number",
    ),
    "several_providers_no_routes": (
        {"providers": {"p": OK_PROVIDER, "q": OK_PROVIDER}},
        "no [[llm.routes]]",
    ),
    "bad_duration": ({"read_timeout": "soon"}, ""),
    "anthropic_messages_not_bool": (
        {"providers": {"p": {**OK_PROVIDER, "anthropic_messages": "yes"}}},
        "true/false",
    ),
    "anthropic_messages_on_openai": (
        {"providers": {"p": {"kind": "openai", "anthropic_messages": True}}},
        "openai-compatible",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_llm_config_is_refused(name: str) -> None:
    table, words = BAD[name]
    with pytest.raises(ConfigError) as e:
        parse_llm_config(table, env={})
    assert words in str(e.value)
    assert "sk-live-123" not in str(e.value)


def test_keys_come_from_env_or_file_and_never_show(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file-0123456789\n")
    s = parse_llm_config(
        {
            "providers": {
                "a": {**OK_PROVIDER, "api_key_env": "UP"},
                "b": {**OK_PROVIDER, "api_key_file": str(key_file), "anthropic_messages": True},
            },
            "routes": [{"model": "a-*", "provider": "a"}, {"model": "*", "provider": "b"}],
        },
        env={"UP": "sk-from-env-0123456789"},
    )
    a, b = s.providers["a"], s.providers["b"]
    assert a.api_key is not None and a.api_key.reveal() == "sk-from-env-0123456789"
    assert b.api_key is not None and b.api_key.reveal() == "sk-from-file-0123456789"
    assert a.protocol == "openai" and b.protocol == "both"
    shown = repr(s) + str(s) + repr(a) + repr(b)
    assert "sk-from" not in shown
    assert s.route("a-1") is not None and s.route("a-1").provider == "a"  # type: ignore[union-attr]
    assert s.route("other").provider == "b"  # type: ignore[union-attr]
