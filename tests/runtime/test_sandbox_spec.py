"""The seam itself: a SandboxSpec or Limits that is wrong cannot be built, each kind of bad
input with its own message; get_backend names what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tether.runtime as runtime
from tether.errors import BadRequest, ConfigError
from tether.runtime import Limits, SandboxSpec, get_backend

GOOD: dict[str, Any] = {
    "beam_id": "b-3f9c01",
    "argv": ("python", "agent.py"),
    "env": {"PATH": "/usr/bin"},
    "workspace": Path("/tmp"),
    "files": {"token": b"t"},
    "bridge_socket": Path("/tmp/gw.sock"),
}

BAD_SPECS: dict[str, tuple[dict[str, Any], str]] = {
    "beam_id_upper": ({"beam_id": "B-1"}, "beam id 'B-1' must match"),
    "beam_id_slash": ({"beam_id": "b/../x"}, "must match"),
    "beam_id_empty": ({"beam_id": ""}, "must match"),
    "beam_id_too_long": ({"beam_id": "b" * 64}, "must match"),
    "argv_empty": ({"argv": ()}, "argv must be a non-empty"),
    "argv_nul": ({"argv": ("a\0b",)}, "without NUL"),
    "argv_not_str": ({"argv": (b"x",)}, "sequence of strings"),
    "env_name_equals": ({"env": {"A=B": "x"}}, "environment variable name 'A=B'"),
    "env_name_empty": ({"env": {"": "x"}}, "environment variable name ''"),
    "env_value_nul": ({"env": {"A": "x\0y"}}, "environment variable name 'A'"),
    "file_path": ({"files": {"../etc/passwd": b""}}, "must be a plain name"),
    "file_subdir": ({"files": {"a/b": b""}}, "must be a plain name"),
    "file_dot": ({"files": {".hidden": b""}}, "must be a plain name"),
    "file_reserved_socket": ({"files": {"gateway.sock": b""}}, "reserved socket name"),
    "port_zero": ({"bridge_port": 0}, "port 0 is outside"),
    "port_high": ({"bridge_port": 70000}, "port 70000 is outside"),
    "egress_port_bad": ({"egress_socket": Path("/e"), "egress_port": -1}, "port -1"),
    "ports_clash": ({"egress_socket": Path("/e"), "egress_port": 8080}, "must differ"),
}


@pytest.mark.parametrize("change,message", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        SandboxSpec(**(GOOD | change))


BAD_LIMITS: dict[str, tuple[dict[str, Any], str]] = {
    "memory_tiny": ({"memory_bytes": 1000}, "below 1 MiB"),
    "cpus_zero": ({"cpus": 0}, "outside 0.01..1024"),
    "cpus_huge": ({"cpus": 5000}, "outside 0.01..1024"),
    "pids_one": ({"pids": 1}, "below 2"),
}


@pytest.mark.parametrize("kw,message", BAD_LIMITS.values(), ids=BAD_LIMITS.keys())
def test_bad_limits_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Limits(**kw)


def test_spec_is_frozen_and_does_not_show_secrets() -> None:
    env = {"OPENAI_API_KEY": "sk-secret"}
    spec = SandboxSpec(**(GOOD | {"env": env, "files": {"token": b"tok-secret"}}))
    env["OPENAI_API_KEY"] = "changed"  # the caller's dict is copied
    assert spec.env["OPENAI_API_KEY"] == "sk-secret"
    with pytest.raises(TypeError):
        spec.env["X"] = "y"  # type: ignore[index]
    assert "secret" not in repr(spec) and "secret" not in str(spec)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown sandbox backend 'docker'") as e:
        get_backend("docker")
    assert "bwrap, runsc" in e.value.diagnostics()


def test_public_surface() -> None:
    assert sorted(runtime.__all__) == runtime.__all__
    assert runtime.__all__ == [
        "BACKENDS",
        "Backend",
        "Leftover",
        "Limits",
        "Sandbox",
        "SandboxSpec",
        "get_backend",
    ]
