"""`/v1/beams` over real HTTP: a real server (uvicorn, the whole app as `tether serve` builds it)
running real bwrap beams, plus every kind of bad input answered in the API's JSON error shape."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tether.gateways.egress import EgressGateway, build_egress_gateway
from tether.gateways.egress.addresses import StaticResolver
from tether.runtime.supervisor import BeamSupervisor
from tether.server.app import create_app
from tether.server.serve import build_server_app
from tether.server.services import Services

# -- bad input: no sandbox needed, the request never gets that far -------------------------


@pytest.fixture
async def api_no_sandbox(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services)
    sup = BeamSupervisor(services, backends={})
    app.state.beams = sup
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tether") as client:
        yield client
    sup.store.close()


GOOD = {"objective": "summarise", "argv": ["python", "agent.py"]}

# name -> (body changes, error words)
BAD_BODIES: dict[str, tuple[dict[str, Any], str]] = {
    "bad_ttl": ({"ttl": "soon"}, "invalid ttl"),
    "zero_ttl": ({"ttl": 0}, "invalid ttl"),
    "bad_memory": ({"memory": "lots"}, "invalid memory size"),
    "tiny_memory": ({"memory": 1000}, "below the minimum"),
    "bad_cpus": ({"cpus": -1}, "cpus"),
    "bad_pids": ({"pids": "many"}, "pids"),
    "empty_argv": ({"argv": []}, "argv must be a non-empty list"),
    "argv_not_a_list": ({"argv": "python agent.py"}, "argv"),
    "unknown_backend": ({"backend": "docker"}, "unknown backend"),
    "malformed_grant": ({"grants": ["gpt-4o"]}, "expected KIND:PATTERN"),
    "unknown_grant_kind": ({"grants": ["root:*"]}, "unknown grant kind"),
    "bad_domain": ({"allow_domains": ["http://evil/"]}, "invalid domain"),
    "no_objective": ({"objective": " "}, "objective is required"),
    "unknown_field": ({"privileged": True}, "privileged"),
    "relative_workspace": ({"workspace": "here"}, "absolute path"),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
async def test_bad_bodies_are_400_in_the_apis_error_shape(
    api_no_sandbox: httpx.AsyncClient, admin_token: str, name: str
) -> None:
    changes, words = BAD_BODIES[name]
    r = await api_no_sandbox.post(
        "/v1/beams", json={**GOOD, **changes}, headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["error"] == "invalid_request" and words in doc["error_description"]


async def test_not_json_and_no_token(api_no_sandbox: httpx.AsyncClient, admin_token: str) -> None:
    r = await api_no_sandbox.post(
        "/v1/beams",
        content=b"{not json",
        headers={"Authorization": f"Bearer {admin_token}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await api_no_sandbox.post("/v1/beams", json=GOOD)
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    r = await api_no_sandbox.get("/v1/beams", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


async def test_a_server_without_beams_says_so(services: Services, admin_token: str) -> None:
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            "/v1/beams", json=GOOD, headers={"Authorization": f"Bearer {admin_token}"}
        )
    assert r.status_code == 503 and r.json()["error"] == "backend_unavailable"


async def test_an_unusable_backend_is_503_naming_why(
    api_no_sandbox: httpx.AsyncClient, admin_token: str
) -> None:
    r = await api_no_sandbox.post(
        "/v1/beams",
        json={**GOOD, "backend": "runsc"},
        headers={"Authorization": f"Bearer {admin_token}"},
    )
    assert r.status_code == 503 and "runsc" in r.json()["error_description"]


# -- a real server with real bwrap ------------------------------------------------------------


def _bwrap_problem() -> str | None:
    from tether.runtime.sandbox import get_backend

    try:
        get_backend("bwrap", state_dir=Path(tempfile.mkdtemp(prefix="ta-probe-")))
    except Exception as e:
        return str(e)
    return None


needs_bwrap = pytest.mark.skipif(
    (why := _bwrap_problem()) is not None, reason=f"this host cannot run bwrap: {why}"
)


class Live:
    def __init__(self, base: str, services: Services, sup: BeamSupervisor, token: str) -> None:
        self.base = base
        self.services = services
        self.sup = sup
        self.token = token
        self.http = httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    async def create(self, *argv: str, **kw: Any) -> dict[str, Any]:
        body = {"objective": "api test", "argv": list(argv), "ttl": "2m", **kw}
        r = await self.http.post("/v1/beams", json=body)
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def frames(self, beam_id: str, **params: Any) -> list[dict[str, Any]]:
        r = await self.http.get(f"/v1/beams/{beam_id}/logs", params={"follow": "true", **params})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines()]


def out_of(frames: list[dict[str, Any]], stream: str = "out") -> str:
    return "".join(base64.b64decode(f["b64"]).decode() for f in frames if f.get("s") == stream)


@contextlib.asynccontextmanager
async def serving(
    services: Services, token: str, egress: EgressGateway | None = None
) -> AsyncIterator[Live]:
    """The server as `tether serve` builds it, on a free port, in this event loop."""
    runtime = Path(tempfile.mkdtemp(prefix="ta-"))
    sup = BeamSupervisor(services, runtime_dir=runtime, egress=egress)
    app, gateway = build_server_app(services, sup)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", proxy_headers=False)
    )
    await sup.start(should_exit=lambda: server.should_exit)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(30):
        while not server.started:
            await asyncio.sleep(0.01)
    lv = Live(f"http://127.0.0.1:{port}", services, sup, token)
    try:
        yield lv
    finally:
        await lv.http.aclose()
        server.should_exit = True
        await task
        await sup.aclose()
        if egress is not None:
            await egress.aclose()
        await gateway.aclose()
        sock.close()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
async def live(services: Services, admin_token: str) -> AsyncIterator[Live]:
    async with serving(services, admin_token) as lv:
        yield lv


GATEWAY_PROBE = """
import json, os, urllib.request, urllib.error
token = open(os.environ['TETHER_TOKEN_FILE']).read()
def call(path, body=None):
    req = urllib.request.Request('http://127.0.0.1:8080' + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={'Authorization': 'Bearer ' + token, 'content-type': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
chat = call('/v1/chat/completions',
            {'model': 'tether-scripted-1', 'messages': [{'role': 'user', 'content': 'hi'}]})
print(json.dumps({'token': token, 'chat': chat, 'beams': call('/v1/beams'),
                  'users': call('/v1/users', {'name': 'mallory'})}))
"""


@needs_bwrap
async def test_a_beam_reaches_the_gateways_only_and_its_identity_dies_with_it(
    live: Live,
) -> None:
    rec = await live.create(
        "python", "-c", GATEWAY_PROBE, grants=["model:tether-scripted-1"], objective="probe"
    )
    frames = await live.frames(rec["id"])
    seen = json.loads(out_of(frames))
    assert frames[-1]["end"] == {**frames[-1]["end"], "reason": "exit", "exit_code": 0}
    # through its bridge the beam reaches the LLM gateway as itself...
    assert seen["chat"] == 200
    # ...and nothing else of the API: refused, and recorded as violations
    assert seen["beams"] == 403 and seen["users"] == 403
    session = live.services.audit.session(rec["id"])
    violations = [e for e in session if e["type"] == "beam.violation"]
    assert {v["data"]["path"] for v in violations} == {"/v1/beams", "/v1/users"}
    invoke = [e for e in session if e["type"] == "llm.invoke"]
    assert invoke and invoke[0]["actor"] == rec["spiffe_id"]
    # after the end its token is refused by the gateway (revoked)
    r = await live.http.post(
        "/v1/chat/completions",
        json={"model": "tether-scripted-1", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {seen['token']}"},
    )
    assert r.status_code == 401 and "revoked" in r.text
    # the token is in no audit entry and no store row (the beam printed it: that is its own)
    token = seen["token"].encode()
    assert not [e for e in live.services.audit.iter_entries() if token in e]
    assert token not in live.services.data_dir.db_path.read_bytes()


@needs_bwrap
async def test_output_streams_before_the_beam_ends(live: Live) -> None:
    script = (
        "import os, time\n"
        "print('first', flush=True)\n"
        "while not os.path.exists('go'): time.sleep(0.01)\n"
        "print('second')\n"
    )
    rec = await live.create("python", "-c", script)
    got: list[dict[str, Any]] = []
    async with live.http.stream(
        "GET", f"/v1/beams/{rec['id']}/logs", params={"follow": "true"}
    ) as resp:
        lines = resp.aiter_lines()
        while out_of(got) != "first\n":
            got.append(json.loads(await anext(lines)))
        state = (await live.http.get(f"/v1/beams/{rec['id']}")).json()["state"]
        assert state == "running"  # the first line arrived while it still runs
        (Path(rec["workspace"]) / "go").write_text("")
        async for line in lines:
            got.append(json.loads(line))
    assert out_of(got) == "first\nsecond\n" and got[-1]["end"]["exit_code"] == 0
    raw = await live.http.get(f"/v1/beams/{rec['id']}/logs", params={"format": "raw"})
    assert raw.content == b"first\nsecond\n"


@needs_bwrap
async def test_ttl_kill_exec_and_the_records(live: Live) -> None:
    sleeper = await live.create("sleep", "3600", ttl="1s")
    frames = await live.frames(sleeper["id"])
    assert frames[-1]["end"]["reason"] == "ttl"
    doc = (await live.http.get(f"/v1/beams/{sleeper['id']}")).json()
    assert doc["state"] == "ended" and doc["end_reason"] == "ttl"
    # its attestation is the first entry of its session, and its entry is in the answer
    first = live.services.audit.session(sleeper["id"])[0]
    assert first["type"] == "beam.attest" and first["index"] == doc["attestation"]["index"]
    assert json.loads(doc["attestation"]["entry"])["index"] == first["index"]
    assert doc["token"]["objective_sha256"] == doc["attestation"]["sha256"]

    other = await live.create("sleep", "3600")
    r = await live.http.post(
        f"/v1/beams/{other['id']}/exec", json={"argv": ["sh", "-c", "id -u; exit 5"]}
    )
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert out_of(lines) == "1000\n" and lines[-1]["end"]["exit_code"] == 5
    r = await live.http.post(f"/v1/beams/{other['id']}/kill")
    assert r.status_code == 200 and r.json()["end_reason"] == "killed"
    r = await live.http.post(f"/v1/beams/{other['id']}/kill")
    assert r.status_code == 409 and r.json()["error"] == "conflict"
    r = await live.http.post(f"/v1/beams/{other['id']}/exec", json={"argv": ["true"]})
    assert r.status_code == 409
    r = await live.http.delete(f"/v1/beams/{other['id']}")
    assert r.status_code == 200
    r = await live.http.get(f"/v1/beams/{other['id']}")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


@needs_bwrap
async def test_policy_deny_is_403_and_recorded(live: Live, services: Services) -> None:
    agent = services.authority.delegate(
        services.verifier.verify(live.token), "ci-bot", ["model:tether-scripted-1"]
    ).token
    (services.data_dir.policies / "20-no-agent-beams.cedar").write_text(
        '@id("no-agent-beams")\n'
        'forbid (principal, action == Tether::Action::"beam.create", resource)\n'
        'when { principal.name like "*/agent/*" };\n'
    )
    services.policy.reload()
    r = await live.http.post(
        "/v1/beams",
        json={"objective": "x", "argv": ["true"]},
        headers={"Authorization": f"Bearer {agent}"},
    )
    assert r.status_code == 403 and r.json()["error"] == "permission_denied"
    denied = services.audit.search(type="beam.create", decision="deny")
    assert len(denied) == 1 and denied[0]["actor"] == "spiffe://example.org/agent/ci-bot"
    # the user is not an agent: still allowed
    rec = await live.create("true")
    assert (await live.frames(rec["id"]))[-1]["end"]["exit_code"] == 0


EGRESS_PROBE = """
import json, sys, urllib.request, urllib.error
port = int(sys.argv[1])
def get(host):
    try:
        with urllib.request.urlopen(f'http://{host}:{port}/hello', timeout=30) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, '']
    except OSError as e:
        return ['error', type(e).__name__]
print(json.dumps({'allowed': get('allowed.test'), 'other': get('other.test')}))
"""


async def _upstream() -> tuple[asyncio.Server, int]:
    """A plain HTTP server on the host's loopback: what the allowed domain resolves to."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"hello from outside"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@needs_bwrap
async def test_allowed_domains_go_through_the_egress_gateway_and_nothing_else(
    home: Path, admin_credential: str
) -> None:
    config = home / "config.toml"
    config.write_text(config.read_text() + '\n[egress]\nallow_private = ["127.0.0.1/32"]\n')
    services = Services(home)
    upstream, port = await _upstream()
    try:
        token = services.authority.login(admin_credential).token
        egress = build_egress_gateway(
            services,
            resolver=StaticResolver({"allowed.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}),
        )
        async with serving(services, token, egress) as lv:
            rec = await lv.create(
                "python", "-c", EGRESS_PROBE, str(port), allow_domains=["allowed.test"]
            )
            assert "egress:allowed.test" in rec["grants"]
            frames = await lv.frames(rec["id"])
            seen = json.loads(out_of(frames))
            await egress.drain()
        assert seen["allowed"] == [200, "hello from outside"]
        assert seen["other"][0] == 403  # not granted: refused by the gateway
        decided = services.audit.search(type="egress.connect", session=rec["id"])
        outcomes = {e["subject"]: e["decision"] for e in decided}
        assert outcomes == {f"allowed.test:{port}": "allow", f"other.test:{port}": "deny"}
        assert all(e["actor"] == rec["spiffe_id"] for e in decided)
    finally:
        upstream.close()
        services.close()


@needs_bwrap
async def test_without_allowed_domains_a_beam_has_no_proxy(live: Live) -> None:
    rec = await live.create(
        "python",
        "-c",
        "import os, json; print(json.dumps(sorted(k for k in os.environ if 'PROXY' in k.upper())))",
    )
    assert json.loads(out_of(await live.frames(rec["id"]))) == []
    # a server without an egress gateway refuses --allow-domain instead of ignoring it
    r = await live.http.post(
        "/v1/beams", json={"objective": "x", "argv": ["true"], "allow_domains": ["pypi.org"]}
    )
    assert r.status_code == 503 and "egress" in r.json()["error_description"]


@needs_bwrap
async def test_the_attestation_proof_holds_and_catches_tampering(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.cli.beam import _Session, prove_attestation
    from tether.errors import VerificationFailed

    rec = await live.create("true", objective="prove me", tools=[{"name": "search"}])
    await live.frames(rec["id"])
    doc = (await live.http.get(f"/v1/beams/{rec['id']}")).json()
    monkeypatch.setenv("TETHER_ADDR", live.base)
    session = await asyncio.to_thread(_Session, live.services.data_dir.root, None)
    try:
        proof = await asyncio.to_thread(prove_attestation, session, doc)
        assert proof["entry_index"] == doc["attestation"]["index"]
        assert proof["checkpoint_size"] > proof["entry_index"]
        assert proof["digest"] == doc["token"]["objective_sha256"]
        assert len(doc["attestation"]["document"]["tools"]) == 1

        entry = doc["attestation"]["entry"]
        tampered = {
            "objective_in_entry": {
                **doc,
                "attestation": {
                    **doc["attestation"],
                    "entry": entry.replace("prove me", "prove it"),
                },
            },
            "token_digest": {**doc, "token": {**doc["token"], "objective_sha256": "0" * 64}},
            "index": {**doc, "attestation": {**doc["attestation"], "index": 0}},
        }
        for name, bad in tampered.items():
            try:
                await asyncio.to_thread(prove_attestation, session, bad)
            except VerificationFailed:
                continue
            pytest.fail(f"a tampered {name} was accepted")
    finally:
        session.close()
