"""Beam requests: every kind of bad input is refused with a message naming what was wrong."""

from __future__ import annotations

from typing import Any

import pytest

from tether.errors import BadRequest
from tether.runtime.beams import (
    BeamRequest,
    parse_beam_request,
    parse_domain,
    parse_memory,
    parse_ttl,
)

GOOD: dict[str, Any] = {"objective": "summarise", "argv": ["python", "agent.py"]}

# name -> (changes to a good request, words the error must contain)
BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "ttl_not_a_duration": ({"ttl": "soon"}, "invalid ttl"),
    "ttl_zero": ({"ttl": "0s"}, "invalid ttl"),
    "ttl_negative": ({"ttl": -5}, "invalid ttl"),
    "ttl_below_minimum": ({"ttl": "500ms"}, "shorter than the minimum"),
    "ttl_unit_typo": ({"ttl": "15mins"}, "invalid ttl"),
    "ttl_boolean": ({"ttl": True}, "invalid ttl"),
    "memory_not_a_size": ({"memory": "lots"}, "invalid memory size"),
    "memory_bad_unit": ({"memory": "2X"}, "invalid memory size"),
    "memory_negative": ({"memory": "-1G"}, "invalid memory size"),
    "memory_too_small": ({"memory": "512K"}, "below the minimum"),
    "memory_absurd": ({"memory": "9999T"}, "larger than any machine"),
    "cpus_not_a_number": ({"cpus": "many"}, "invalid cpus"),
    "cpus_zero": ({"cpus": 0}, "outside 0.01..1024"),
    "cpus_nan": ({"cpus": "nan"}, "invalid cpus"),
    "pids_fraction": ({"pids": 2.5}, "invalid pids"),
    "pids_one": ({"pids": 1}, "outside 2.."),
    "argv_empty": ({"argv": []}, "argv must be a non-empty list"),
    "argv_missing": ({"argv": None}, "argv must be a non-empty list"),
    "argv_empty_command": ({"argv": [""]}, "argv[0]"),
    "argv_not_strings": ({"argv": ["echo", 3]}, "list of strings"),
    "argv_nul": ({"argv": ["echo", "a\0b"]}, "NUL"),
    "argv_too_long": ({"argv": ["x" * 9000]}, "longer than"),
    "backend_unknown": ({"backend": "docker"}, "unknown backend 'docker'"),
    "grant_no_kind": ({"grants": ["gpt-4o"]}, "expected KIND:PATTERN"),
    "grant_unknown_kind": ({"grants": ["disk:/etc"]}, "unknown grant kind"),
    "grant_bad_pattern": ({"grants": ["model:gpt 4o"]}, "invalid grant pattern"),
    "grant_bad_budget": ({"grants": ["budget:tokens=lots"]}, "invalid amount"),
    "grants_not_a_list": ({"grants": "model:*"}, "grants must be a list"),
    "domain_with_scheme": ({"allow_domains": ["https://api.github.com"]}, "invalid domain"),
    "domain_with_path": ({"allow_domains": ["api.github.com/x"]}, "invalid domain"),
    "domain_bad_port": ({"allow_domains": ["api.github.com:99999"]}, "invalid port"),
    "objective_missing": ({"objective": ""}, "objective is required"),
    "objective_huge": ({"objective": "x" * 5000}, "objective is longer"),
    "workspace_relative": ({"workspace": "work"}, "absolute path"),
    "keep_workspace_not_bool": ({"keep_workspace": "yes"}, "true or false"),
    "unknown_field": ({"privileged": True}, "unknown field 'privileged'"),
    "tools_not_objects": ({"tools": ["search"]}, "tool definitions"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_are_refused_clearly(name: str) -> None:
    changes, words = BAD_REQUESTS[name]
    with pytest.raises(BadRequest) as info:
        parse_beam_request({**GOOD, **changes})
    assert words in info.value.message
    assert info.value.status == 400


def test_a_good_request() -> None:
    r = parse_beam_request(
        {
            **GOOD,
            "grants": ["model:gpt-4o-mini", "tool:search"],
            "ttl": "1h30m",
            "memory": "1.5G",
            "cpus": "0.5",
            "pids": 64,
            "allow_domains": ["API.GitHub.com.", "*.pypi.org", "pypi.org:443"],
        }
    )
    assert isinstance(r, BeamRequest)
    assert r.ttl == 5400.0 and r.argv == ("python", "agent.py") and r.backend == "bwrap"
    assert r.limits.memory_bytes == int(1.5 * (1 << 30))
    assert r.limits.cpus == 0.5 and r.limits.pids == 64
    assert r.allow_domains == ("api.github.com", "*.pypi.org", "pypi.org:443")
    # each allowed domain becomes an egress grant, which the authority attenuates like any
    assert r.grants == (
        "model:gpt-4o-mini",
        "tool:search",
        "egress:api.github.com",
        "egress:*.pypi.org",
        "egress:pypi.org:443",
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900.0), ("90s", 90.0), ("1h", 3600.0), (2, 2.0)]
)
def test_ttls(text: str | int, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2G", 2 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1g", 1 << 30),
        (1 << 21, 1 << 21),
    ],
)
def test_memory_sizes(text: str | int, size: int) -> None:
    assert parse_memory(text) == size


def test_domains_are_normalised() -> None:
    assert parse_domain("Example.ORG.") == "example.org"
