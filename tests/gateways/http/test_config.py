"""The [http] table: services, credentials from env or file only, rules, limits."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tether.errors import ConfigError
from tether.gateways.http.config import parse_http_config

ENV = {"CRM_TOKEN": "tok-0123456789abcdef", "PW": "pw-0123456789", "USER": "svc"}


def _svc(**kw: Any) -> dict[str, Any]:
    return {"services": {"crm": {"base_url": "https://crm.internal/api", **kw}}}


def test_full_example(tmp_path: Path) -> None:
    key_file = tmp_path / "maps.key"
    key_file.write_text("maps-key-from-file-0000\n")
    s = parse_http_config(
        {
            "max_body_bytes": 1000,
            "timeout": "7s",
            "escalation_hold": "30s",
            "services": {
                "crm": {
                    "base_url": "https://crm.internal/api/",
                    "auth": {"type": "bearer", "secret_env": "CRM_TOKEN"},
                    "timeout": "2s",
                    "rules": [
                        {"methods": ["get"], "paths": ["/customers/*"]},
                        {"methods": ["POST"], "paths": ["/orders"], "effects": ["crm.write"]},
                        {"paths": ["/x"], "effects": {"crm.bulk": 5}},
                    ],
                },
                "billing": {
                    "base_url": "http://127.0.0.1:9000",
                    "auth": {"type": "basic", "user_env": "USER", "secret_env": "PW"},
                    "forward_cookies": True,
                },
                "maps": {
                    "base_url": "http://maps",
                    "auth": {"type": "header", "name": "X-Api-Key", "secret_file": str(key_file)},
                },
            },
        },
        env=ENV,
    )
    crm = s.services["crm"]
    assert crm.base_url == "https://crm.internal/api"
    assert crm.auth.header == "authorization"
    assert crm.auth.value is not None and crm.auth.value.reveal() == "Bearer " + ENV["CRM_TOKEN"]
    assert crm.auth.source == "env:CRM_TOKEN"
    assert crm.limits.timeout == 2.0 and crm.limits.max_body_bytes == 1000
    assert crm.limits.escalation_hold == 30.0
    assert crm.rule_for("GET", "/customers/42") is crm.rules[0]
    assert crm.rule_for("GET", "/customers/42/notes") is crm.rules[0]
    assert crm.rule_for("GET", "/customers") is None
    assert crm.rule_for("DELETE", "/customers/42") is None
    assert crm.rule_for("POST", "/orders") is not None
    assert crm.rules[1].effects == {"crm.write": 1}
    assert crm.rule_for("PATCH", "/x") is crm.rules[2]  # methods default to any
    assert crm.rules[2].effects == {"crm.bulk": 5}
    billing = s.services["billing"]
    assert billing.auth.value is not None
    assert billing.auth.value.reveal() == "Basic " + base64.b64encode(b"svc:pw-0123456789").decode()
    assert billing.limits.forward_cookies and not crm.limits.forward_cookies
    assert billing.limits.timeout == 7.0
    maps = s.services["maps"]
    assert maps.auth.header == "x-api-key"
    assert maps.auth.value is not None and maps.auth.value.reveal() == "maps-key-from-file-0000"


def test_rule_star_is_the_only_wildcard() -> None:
    s = parse_http_config(_svc(rules=[{"methods": ["GET"], "paths": ["/a.b/*/c"]}]), env=ENV)
    crm = s.services["crm"]
    assert crm.rule_for("GET", "/a.b/x/y/c")
    assert not crm.rule_for("GET", "/aXb/x/c")  # '.' is literal


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    s = parse_http_config(_svc(auth={"type": "basic", "user": "svc", "secret_env": "PW"}), env=ENV)
    text = repr(s) + str(s.services["crm"]) + repr(s.services["crm"].auth.value)
    assert ENV["PW"] not in text
    assert base64.b64encode(b"svc:" + ENV["PW"].encode()).decode() not in text
    assert "env:PW" in text  # where it came from is fine


BAD = {
    "literal-secret": _svc(auth={"type": "bearer", "secret": "x"}),
    "literal-token": _svc(auth={"type": "bearer", "token": "x"}),
    "literal-password": _svc(auth={"type": "basic", "user": "u", "password": "x"}),
    "unknown-auth-type": _svc(auth={"type": "oauth", "secret_env": "CRM_TOKEN"}),
    "env-not-set": _svc(auth={"type": "bearer", "secret_env": "NOPE"}),
    "env-and-file": _svc(auth={"type": "bearer", "secret_env": "CRM_TOKEN", "secret_file": "/x"}),
    "no-secret-source": _svc(auth={"type": "bearer"}),
    "missing-file": _svc(auth={"type": "bearer", "secret_file": "/nonexistent/secret"}),
    "header-without-name": _svc(auth={"type": "header", "secret_env": "CRM_TOKEN"}),
    "header-as-host": _svc(auth={"type": "header", "name": "Host", "secret_env": "CRM_TOKEN"}),
    "header-hop-by-hop": _svc(
        auth={"type": "header", "name": "Connection", "secret_env": "CRM_TOKEN"}
    ),
    "header-name-with-colon": _svc(
        auth={"type": "header", "name": "X:y", "secret_env": "CRM_TOKEN"}
    ),
    "basic-user-with-colon": _svc(auth={"type": "basic", "user": "a:b", "secret_env": "PW"}),
    "base-url-ftp": {"services": {"crm": {"base_url": "ftp://x"}}},
    "base-url-missing": {"services": {"crm": {}}},
    "base-url-userinfo": {"services": {"crm": {"base_url": "http://u:p@x"}}},
    "base-url-query": {"services": {"crm": {"base_url": "http://x/?a=1"}}},
    "bad-service-name": {"services": {"CRM/x": {"base_url": "http://x"}}},
    "service-typo-key": _svc(base_ulr="http://x"),
    "http-typo-key": {"max_body": 5},
    "rule-path-relative": _svc(rules=[{"methods": ["GET"], "paths": ["customers"]}]),
    "rule-path-dotdot": _svc(rules=[{"methods": ["GET"], "paths": ["/a/../b"]}]),
    "rule-path-query": _svc(rules=[{"methods": ["GET"], "paths": ["/a?b"]}]),
    "rule-unknown-method": _svc(rules=[{"methods": ["TRACE"], "paths": ["/a"]}]),
    "rule-no-paths": _svc(rules=[{"methods": ["GET"]}]),
    "rule-typo-key": _svc(rules=[{"method": ["GET"], "paths": ["/a"]}]),
    "rule-bad-effect-count": _svc(rules=[{"paths": ["/a"], "effects": {"x": 0}}]),
    "rule-bad-effect-name": _svc(rules=[{"paths": ["/a"], "effects": ["bad effect"]}]),
    "negative-body-cap": {"max_body_bytes": -1},
    "bad-timeout": {"timeout": "soon"},
}


@pytest.mark.parametrize("table", BAD.values(), ids=BAD.keys())
def test_refuses(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_http_config(table, env=ENV)


def test_secret_with_newline_refused_without_echoing_it(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("abc\r\nX-Evil: 1\n")
    with pytest.raises(ConfigError) as e:
        parse_http_config(_svc(auth={"type": "bearer", "secret_file": str(f)}), env=ENV)
    assert "control characters" in e.value.message
    assert "X-Evil" not in e.value.message


def test_literal_secret_error_does_not_echo_it() -> None:
    with pytest.raises(ConfigError) as e:
        parse_http_config(_svc(auth={"type": "bearer", "secret": "super-secret-value"}), env=ENV)
    assert "super-secret-value" not in e.value.diagnostics()


def test_no_table_no_services() -> None:
    assert parse_http_config(None, env={}).services == {}
