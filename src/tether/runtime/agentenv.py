"""The environment and credential files a beam starts with: its own token, the gateways' URLs,
and nothing of the host's.

An unmodified agent needs no Tether library: the OpenAI and Anthropic SDKs read their base URL
and API key from the environment, and both point at the in-beam forwarder, which relays to the
server's gateways over the bridge socket. The API key *is* the beam's own short-lived delegated
JWT-SVID, so every call it makes is decided and recorded as the beam.

Inside a beam::

    OPENAI_BASE_URL      http://127.0.0.1:<bridge_port>/v1
    ANTHROPIC_BASE_URL   http://127.0.0.1:<bridge_port>
    OPENAI_API_KEY       the beam's token      ANTHROPIC_API_KEY   the same
    TETHER_URL           http://127.0.0.1:<bridge_port>   (MCP at /mcp, HTTP at /http/...)
    TETHER_BEAM_ID       b-3f9c0a1b2c3d        TETHER_SPIFFE_ID    spiffe://TD/beam/b-...
    TETHER_TOKEN_FILE    /run/tether/token     TETHER_BUNDLE_FILE  /run/tether/bundle.json
    TETHER_ATTESTATION_FILE /run/tether/attestation.json
    TETHER_ATTESTATION_SHA256  the attestation digest (also the token's objective_sha256)
    HOME=/workspace  TMPDIR=/tmp  PATH=<interpreter bin>:/usr/local/bin:/usr/bin:/bin
    LANG=C.UTF-8  PYTHONUNBUFFERED=1 (output reaches `tether run` as it is printed)
    with --allow-domain: HTTPS_PROXY / HTTP_PROXY (and lower case) = http://127.0.0.1:<egress>,
                         NO_PROXY=127.0.0.1,localhost so gateway calls never go via the proxy
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tether.audit.canonical import canonical_json

__all__ = [
    "ATTESTATION_FILE",
    "BUNDLE_FILE",
    "RUN_DIR",
    "TOKEN_FILE",
    "beam_environment",
    "beam_files",
    "default_path",
]

RUN_DIR = "/run/tether"
TOKEN_FILE = "token"  # noqa: S105 - a file name, not a secret
BUNDLE_FILE = "bundle.json"
ATTESTATION_FILE = "attestation.json"
WORKSPACE = "/workspace"
_SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


def default_path() -> str:
    """The interpreter's own bin directory first (so ``python`` inside is the one Tether runs
    with and its packages), then the system's."""
    dirs = [os.path.dirname(os.path.abspath(sys.executable))]
    dirs += [d for d in _SYSTEM_PATH if d not in dirs]
    return ":".join(dirs)


def beam_environment(
    *,
    beam_id: str,
    spiffe_id: str,
    token: str,
    attestation_sha256: str,
    bridge_port: int,
    egress_port: int | None = None,
    path: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The *whole* environment of the beam's command. Nothing is inherited from the host."""
    gateway = f"http://127.0.0.1:{bridge_port}"
    env = {
        "PATH": path or default_path(),
        "HOME": WORKSPACE,
        "TMPDIR": "/tmp",  # noqa: S108 - the beam's own private /tmp
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "OPENAI_BASE_URL": f"{gateway}/v1",
        "OPENAI_API_KEY": token,
        "ANTHROPIC_BASE_URL": gateway,
        "ANTHROPIC_API_KEY": token,
        "TETHER_URL": gateway,
        "TETHER_BEAM_ID": beam_id,
        "TETHER_SPIFFE_ID": spiffe_id,
        "TETHER_TOKEN_FILE": f"{RUN_DIR}/{TOKEN_FILE}",
        "TETHER_BUNDLE_FILE": f"{RUN_DIR}/{BUNDLE_FILE}",
        "TETHER_ATTESTATION_FILE": f"{RUN_DIR}/{ATTESTATION_FILE}",
        "TETHER_ATTESTATION_SHA256": attestation_sha256,
    }
    if egress_port is not None:
        proxy = f"http://127.0.0.1:{egress_port}"
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            env[name] = proxy
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if extra:
        env.update(extra)
    return env


def beam_files(
    token: str, bundle: Mapping[str, Any], attestation: Mapping[str, Any]
) -> dict[str, bytes]:
    """Files under ``/run/tether`` (read-only inside): the token, the trust bundle that
    verifies it (and every other Tether SVID) offline, and the attestation document."""
    return {
        TOKEN_FILE: token.encode(),
        BUNDLE_FILE: json.dumps(dict(bundle), indent=2).encode() + b"\n",
        ATTESTATION_FILE: canonical_json(dict(attestation)),
    }


def secret_values(env: Mapping[str, str], names: Sequence[str] = ()) -> set[str]:
    """Values in ``env`` that are secrets (the token under its several names)."""
    keys = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", *names}
    return {v for k, v in env.items() if k in keys and v}
