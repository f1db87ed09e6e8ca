"""The ``[mcp]`` table: valid configs parse; each named bad one is refused with a ConfigError
that says what is wrong; credentials never come from config.toml and never show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tether.errors import ConfigError
from tether.gateways.mcp.config import (
    DEFAULT_ESCALATION_HOLD,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    parse_mcp_config,
)

URL = "http://127.0.0.1:9000/mcp"

# name -> (the [mcp] table, text the error must contain)
BAD_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown_top_key": ({"servres": {}}, "unknown key(s) servres"),
    "servers_not_a_table": ({"servers": ["db"]}, "[mcp.servers] must be a table"),
    "server_not_a_table": ({"servers": {"db": "http://x"}}, "[mcp.servers.db] must be a table"),
    "server_name_with_dot": ({"servers": {"d.b": {"url": URL}}}, "no dots"),
    "server_name_upper_case": ({"servers": {"DB": {"url": URL}}}, "lower-case"),
    "neither_url_nor_command": ({"servers": {"db": {}}}, "needs either url"),
    "both_url_and_command": (
        {"servers": {"db": {"url": URL, "command": ["x"]}}},
        "needs either url",
    ),
    "url_not_http": ({"servers": {"db": {"url": "ftp://x/mcp"}}}, 'url must be "http://'),
    "command_empty": ({"servers": {"db": {"command": []}}}, "command must be a list"),
    "command_not_strings": ({"servers": {"db": {"command": ["x", 1]}}}, "command must be a list"),
    "api_key_in_config": (
        {"servers": {"db": {"url": URL, "api_key": "sk-123"}}},
        "credentials never live in config.toml",
    ),
    "token_in_config": (
        {"servers": {"db": {"url": URL, "token": "abc"}}},
        "credentials never live in config.toml",
    ),
    "secret_in_a_header": (
        {"servers": {"db": {"url": URL, "headers": {"X-Api-Key": "abc"}}}},
        "looks like a credential",
    ),
    "authorization_header": (
        {"servers": {"db": {"url": URL, "headers": {"Authorization": "Bearer abc"}}}},
        "looks like a credential",
    ),
    "header_injection": (
        {"servers": {"db": {"url": URL, "headers": {"X-Tenant": "a\r\nX-Evil: 1"}}}},
        "line break",
    ),
    "hop_header": ({"servers": {"db": {"url": URL, "headers": {"Host": "x"}}}}, "cannot be set"),
    "secret_in_stdio_env": (
        {"servers": {"db": {"command": ["x"], "env": {"DB_PASSWORD": "hunter2"}}}},
        "looks like a secret",
    ),
    "env_on_an_http_server": (
        {"servers": {"db": {"url": URL, "env": {"A": "b"}}}},
        "applies to stdio servers",
    ),
    "headers_on_a_stdio_server": (
        {"servers": {"db": {"command": ["x"], "headers": {"A": "b"}}}},
        "applies to HTTP servers",
    ),
    "credential_env_unset": (
        {"servers": {"db": {"url": URL, "credential_env": "NOT_SET_ANYWHERE"}}},
        "NOT_SET_ANYWHERE is not set",
    ),
    "credential_env_and_file": (
        {"servers": {"db": {"url": URL, "credential_env": "A", "credential_file": "/x"}}},
        "not both",
    ),
    "credential_file_missing": (
        {"servers": {"db": {"url": URL, "credential_file": "/nonexistent/secret"}}},
        "cannot read credential_file",
    ),
    "pin_mode_unknown": ({"servers": {"db": {"url": URL, "pin": "never"}}}, 'pin must be "auto"'),
    "record_first_not_bool": (
        {"servers": {"db": {"url": URL, "record_first": "yes"}}},
        "record_first must be true or false",
    ),
    "passthrough_unknown_method": (
        {"servers": {"db": {"url": URL, "passthrough": ["tools/call"]}}},
        "passthrough must list methods",
    ),
    "timeout_not_a_duration": (
        {"servers": {"db": {"url": URL, "timeout": "soon"}}},
        "timeout: not a duration",
    ),
    "negative_message_limit": ({"max_message_bytes": -1}, "max_message_bytes must be a positive"),
    "effects_not_kinds": (
        {"servers": {"db": {"url": URL, "effects": {"create_index": 5}}}},
        "effects.create_index",
    ),
    "unknown_server_key": (
        {"servers": {"db": {"url": URL, "retries": 3}}},
        "unknown key(s) retries",
    ),
    "origins_not_a_list": ({"allowed_origins": "https://x"}, "allowed_origins must be a list"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_config_is_refused_with_a_clear_error(case: str) -> None:
    table, text = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as e:
        parse_mcp_config(table, env={})
    assert text in e.value.diagnostics(), e.value.diagnostics()


def test_a_full_config_parses_with_named_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "files-token"
    secret.write_text("file-secret-value\n")
    s = parse_mcp_config(
        {
            "timeout": "10s",
            "servers": {
                "db": {
                    "url": URL + "/",
                    "headers": {"X-Tenant": "acme"},
                    "credential_env": "DB_TOKEN",
                    "effects": {"create_index": "db.schema_change", "drop": ["a", "b"]},
                    "escalation_hold": "0s",
                },
                "files": {
                    "command": "python -m files_server --root /srv",
                    "env": {"LOG_LEVEL": "info"},
                    "secret_env": {"FILES_PASSWORD": "GW_FILES_PASSWORD"},
                    "pin": "approve",
                    "record_first": False,
                },
                "api": {
                    "url": "https://api.example/mcp",
                    "credential_file": str(secret),
                    "credential_header": "X-Api-Key",
                },
            },
        },
        env={"DB_TOKEN": "db-secret-value", "GW_FILES_PASSWORD": "pw-secret-value"},
    )
    assert s.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    db, files, api = s.servers["db"], s.servers["files"], s.servers["api"]
    assert db.kind == "http" and db.url == URL and db.timeout == 10.0
    assert db.escalation_hold == 0.0 and files.escalation_hold == DEFAULT_ESCALATION_HOLD
    assert files.kind == "stdio" and files.command[:3] == ("python", "-m", "files_server")
    assert files.pin == "approve" and not files.record_first
    assert db.effects_of("create_index") == {"db.schema_change": 1}
    assert db.effects_of("drop") == {"a": 1, "b": 1}
    assert db.effects_of("read_rows") == {}
    assert (b"authorization", b"Bearer db-secret-value") in db.upstream_headers()
    assert (b"x-api-key", b"file-secret-value") in api.upstream_headers()
    assert (b"x-tenant", b"acme") in db.upstream_headers()
    assert s.servers["api"].timeout == 10.0 and DEFAULT_TIMEOUT != 10.0
    # the secrets never show in a repr or str
    for text in (repr(s), str(s), repr(db), repr(files), repr(api), repr(db.credential)):
        for value in ("db-secret-value", "pw-secret-value", "file-secret-value"):
            assert value not in text


def test_no_mcp_table_means_no_servers() -> None:
    assert parse_mcp_config(None, env={}).servers == {}
