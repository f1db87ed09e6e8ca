"""Bad input, each kind a named fixture: a clear JSON-RPC error, nothing forwarded that policy
did not allow, and the attempt in the audit log. Raw HTTP here (an SDK client will not send
most of these); upstream faults come from a scripted "liar" server and the stdio server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.gateways.mcp.conftest import STDIO_SERVER, Running, serve_gateway
from tests.gateways.mcp.servers import DbServer, Liar, Served
from tether.gateways.mcp import jsonrpc as rpc
from tether.server.services import Services, init_data_dir

ACCEPT = "application/json, text/event-stream"
CONFUSABLE = "read_r\u043ews"  # a Cyrillic o


def _init(version: str = "2025-06-18") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }


class Raw:
    """A raw JSON-RPC client with an open session."""

    def __init__(self, http: httpx.AsyncClient, path: str, session: str) -> None:
        self.http, self.path, self.session = http, path, session

    async def post(self, body: Any, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        h = {"mcp-session-id": self.session, "content-type": "application/json", **headers}
        return await self.http.post(self.path, content=content, headers=h)

    async def call(self, name: str, arguments: Any = None) -> httpx.Response:
        params: dict[str, Any] = {"name": name}
        if arguments is not None:
            params["arguments"] = arguments
        return await self.post(
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}
        )


@asynccontextmanager
async def open_raw(base: str, token: str, server: str = "db") -> AsyncIterator[Raw]:
    async with httpx.AsyncClient(
        base_url=base, headers={"authorization": f"Bearer {token}", "accept": ACCEPT}, timeout=30
    ) as http:
        r = await http.post(f"/mcp/{server}", json=_init())
        assert r.status_code == 200, r.text
        yield Raw(http, f"/mcp/{server}", r.headers["mcp-session-id"])


@dataclass
class Shared:
    """One data dir, upstream and gateway for the many cases that only send one message."""

    services: Services
    db: DbServer
    gateway: Running
    token: str

    def recorded(self) -> int:
        return len(refused(self.services)) + len(denied_calls(self.services))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    home = tmp_path_factory.mktemp("mcp-bad") / "home"
    init_data_dir(home, "example.org")
    services = Services(home)
    db = DbServer()
    db_served = Served(db.app(), lifespan="on").start()
    table = {"servers": {"db": {"url": db_served.url + "/mcp"}, "files": {"command": ["true"]}}}
    gw = serve_gateway(services, table)
    cred = (home / "credentials" / "admin").read_text().strip()
    admin = services.verifier.verify(services.authority.login(cred).token)
    token = services.authority.delegate(admin, "bot", ["tool:db.*"], task="t").token
    try:
        yield Shared(services, db, gw, token)
    finally:
        gw.served.stop()
        db_served.stop()
        services.close()


@pytest.fixture
async def raw(shared: Shared) -> AsyncIterator[Raw]:
    async with open_raw(shared.gateway.base, shared.token) as r:
        yield r


def refused(services: Services) -> list[dict[str, Any]]:
    return services.audit.search(type="mcp.refused", limit=1000)


def denied_calls(services: Services) -> list[dict[str, Any]]:
    return services.audit.search(type="tool.call", decision="deny", limit=1000)


def call(name: Any, arguments: Any = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params}


# name -> (body, HTTP status, JSON-RPC code, data.reason)
BAD_MESSAGES: dict[str, tuple[Any, int, int, str]] = {
    "not_json": (b"{nope", 400, rpc.PARSE_ERROR, "parse_error"),
    "empty_body": (b"", 400, rpc.PARSE_ERROR, "parse_error"),
    "batch": (
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]',
        400,
        rpc.INVALID_REQUEST,
        "batch_refused",
    ),
    "not_an_object": (b'"ping"', 400, rpc.INVALID_REQUEST, "invalid_request"),
    "wrong_jsonrpc_version": (
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        400,
        rpc.INVALID_REQUEST,
        "invalid_request",
    ),
    "no_method": ({"jsonrpc": "2.0", "id": 1}, 400, rpc.INVALID_REQUEST, "invalid_request"),
    "method_not_a_string": (
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        400,
        rpc.INVALID_REQUEST,
        "invalid_request",
    ),
    "null_id": (
        {"jsonrpc": "2.0", "id": None, "method": "ping"},
        400,
        rpc.INVALID_REQUEST,
        "invalid_request",
    ),
    "bool_id": (
        {"jsonrpc": "2.0", "id": True, "method": "ping"},
        400,
        rpc.INVALID_REQUEST,
        "invalid_request",
    ),
    "response_from_client": (
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        400,
        rpc.INVALID_REQUEST,
        "unexpected_response",
    ),
    "params_not_an_object": (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1]},
        200,
        rpc.INVALID_PARAMS,
        "invalid_params",
    ),
    "unknown_method": (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/destroy"},
        200,
        rpc.METHOD_NOT_FOUND,
        "method_not_found",
    ),
    "resources_not_passed_through": (
        {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///x"}},
        200,
        rpc.METHOD_NOT_FOUND,
        "method_not_found",
    ),
    "sampling_request_to_a_server": (
        {"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}},
        200,
        rpc.METHOD_NOT_FOUND,
        "method_not_found",
    ),
    "call_name_not_a_string": (call(5), 200, rpc.INVALID_PARAMS, "invalid_params"),
    "call_without_name": (
        {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {}},
        200,
        rpc.INVALID_PARAMS,
        "invalid_params",
    ),
    "call_arguments_not_an_object": (
        call("read_rows", [1, 2]),
        200,
        rpc.INVALID_PARAMS,
        "invalid_params",
    ),
    "call_arguments_beyond_i_json": (
        call("read_rows", {"limit": 2**60}),
        200,
        rpc.INVALID_PARAMS,
        "invalid_params",
    ),
    "call_unknown_tool": (call("format_disk", {}), 200, rpc.INVALID_PARAMS, "unknown_tool"),
    "call_case_variant_of_a_tool": (call("Read_Rows", {}), 200, rpc.INVALID_PARAMS, "unknown_tool"),
    "call_confusable_of_a_tool": (call(CONFUSABLE, {}), 200, rpc.INVALID_PARAMS, "unknown_tool"),
    "initialize_with_wrong_types": (
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 5}},
        200,
        rpc.INVALID_PARAMS,
        "invalid_params",
    ),
}


@pytest.mark.parametrize("case", BAD_MESSAGES, ids=list(BAD_MESSAGES))
async def test_bad_message(case: str, raw: Raw, shared: Shared) -> None:
    body, status, code, reason = BAD_MESSAGES[case]
    services, db = shared.services, shared.db
    before = shared.recorded()
    r = await raw.post(body)
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["jsonrpc"] == "2.0" and "result" not in doc
    assert doc["error"]["code"] == code, doc
    assert doc["error"]["data"]["reason"] == reason, doc
    assert doc["error"]["message"]
    assert db.calls == []  # nothing reached the upstream
    assert shared.recorded() == before + 1, "the attempt is recorded"
    if case.startswith("call_") and "tool" in case:
        assert "did you mean 'read_rows'" in doc["error"]["message"] or case == "call_unknown_tool"
        assert denied_calls(services)[-1]["data"]["decision"]["policies"] == ["tether:mcp-catalog"]


# name -> (headers, expected status, reason)
BAD_AUTH: dict[str, tuple[dict[str, str], int, str]] = {
    "no_token": ({}, 401, "unauthenticated"),
    "basic_scheme": ({"authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, 401, "unauthenticated"),
    "empty_bearer": ({"authorization": "Bearer"}, 401, "unauthenticated"),
    "garbage_token": ({"authorization": "Bearer not.a.jwt"}, 401, "invalid_token"),
}


@pytest.mark.parametrize("case", BAD_AUTH, ids=list(BAD_AUTH))
async def test_missing_or_bad_token(case: str, shared: Shared) -> None:
    headers, status, reason = BAD_AUTH[case]
    services = shared.services
    async with httpx.AsyncClient(base_url=shared.gateway.base) as h:
        r = await h.post("/mcp/db", json=_init(), headers={"accept": ACCEPT, **headers})
    assert r.status_code == status
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == rpc.UNAUTHENTICATED
    assert r.json()["error"]["data"]["reason"] == reason
    assert "mcp-session-id" not in r.headers
    assert refused(services)[-1]["data"]["status"] == 401


async def test_foreign_trust_domain_token_is_refused(
    gateway: Running, tmp_path: Path, services: Services
) -> None:
    other_home = tmp_path / "other"
    init_data_dir(other_home, "other.org")
    other = Services(other_home)
    try:
        cred = (other_home / "credentials" / "admin").read_text().strip()
        admin = other.verifier.verify(other.authority.login(cred).token)
        foreign = other.authority.delegate(admin, "bot", ["tool:*"]).token
    finally:
        other.close()
    async with httpx.AsyncClient(base_url=gateway.base) as h:
        r = await h.post(
            "/mcp/db",
            json=_init(),
            headers={"accept": ACCEPT, "authorization": f"Bearer {foreign}"},
        )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == rpc.UNAUTHENTICATED


async def test_revoked_token_is_refused_mid_session(
    gateway: Running, mint: Callable[..., str], services: Services, admin_token: str
) -> None:
    tok = mint(name="doomed")
    async with open_raw(gateway.base, tok) as raw:
        assert (await raw.call("read_rows", {"table": "t"})).json().get("result")
        admin = services.verifier.verify(admin_token)
        services.authority.revoke(admin, "agent", "spiffe://example.org/agent/doomed", "test")
        r = await raw.call("read_rows", {"table": "t"})
    assert r.status_code == 401
    assert r.json()["error"]["data"]["reason"] == "token_revoked"


async def test_another_identity_cannot_use_my_session(
    gateway: Running, mint: Callable[..., str], db: DbServer, services: Services
) -> None:
    async with (
        open_raw(gateway.base, mint(name="alice-bot")) as mine,
        httpx.AsyncClient(
            base_url=gateway.base,
            headers={"authorization": f"Bearer {mint(name='mallory-bot')}", "accept": ACCEPT},
        ) as other,
    ):
        stolen = Raw(other, "/mcp/db", mine.session)
        r = await stolen.call("read_rows", {"table": "t"})
        assert r.status_code == 404
        assert r.json()["error"]["data"] == {"reason": "session_not_found"}  # nothing more
        note = services.audit.search(type="mcp.refused")[-1]["data"]["note"]
        assert note == "opened by spiffe://example.org/agent/alice-bot"
        # a session opened for one server is not valid on another
        r2 = await Raw(mine.http, "/mcp/files", mine.session).call("read_file", {"path": "x"})
        assert r2.status_code == 404
        r3 = await Raw(mine.http, "/mcp/db", "f" * 32).call("read_rows", {"table": "t"})
        assert r3.status_code == 404
        r4 = await mine.http.post("/mcp/db", json=call("read_rows", {"table": "t"}))  # no session
        assert r4.status_code == 400
        assert r4.json()["error"]["data"]["reason"] == "session_required"
    assert db.calls == []


# name -> (method, path, headers, status, reason)
BAD_HTTP: dict[str, tuple[str, str, dict[str, str], int, str]] = {
    "get_server_stream": ("GET", "/mcp/db", {}, 405, "method_not_allowed"),
    "put": ("PUT", "/mcp/db", {}, 405, "method_not_allowed"),
    "unknown_server": ("POST", "/mcp/nope", {}, 404, "unknown_server"),
    "cross_site_origin": (
        "POST",
        "/mcp/db",
        {"origin": "https://evil.example"},
        403,
        "origin_refused",
    ),
    "unsupported_protocol_version": (
        "POST",
        "/mcp/db",
        {"mcp-protocol-version": "1999-01-01"},
        400,
        "unsupported_protocol_version",
    ),
}


@pytest.mark.parametrize("case", BAD_HTTP, ids=list(BAD_HTTP))
async def test_bad_http(case: str, raw: Raw, shared: Shared) -> None:
    method, path, headers, status, reason = BAD_HTTP[case]
    before = shared.recorded()
    r = await raw.http.request(
        method,
        path,
        content=orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        headers={"mcp-session-id": raw.session, **headers},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["data"]["reason"] == reason
    if status == 405:
        assert r.headers["allow"] == "POST, DELETE"
    # the optional GET stream SDK clients open on every connect is answered, not recorded
    assert shared.recorded() == before + (0 if case == "get_server_stream" else 1)


@pytest.fixture
def small_table(table: dict[str, Any]) -> dict[str, Any]:
    table["max_message_bytes"] = 2048
    return table


async def test_oversized_message_is_refused_before_it_is_read(
    services: Services, small_table: dict[str, Any], token: str, db: DbServer
) -> None:
    gw = serve_gateway(services, small_table)
    try:
        async with open_raw(gw.base, token) as raw:
            big = call("read_rows", {"table": "x" * 4000})
            r = await raw.post(big)
            assert r.status_code == 413
            err = r.json()["error"]
            assert err["data"] == {"reason": "message_too_large", "limit": 2048}

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
                body = orjson.dumps(big)
                for i in range(0, len(body), 512):
                    yield body[i : i + 512]

            r2 = await raw.http.post(
                "/mcp/db",
                content=chunks(),
                headers={"mcp-session-id": raw.session, "content-type": "application/json"},
            )
            assert r2.status_code == 413
        assert db.calls == []
        assert [e["data"]["reason"] for e in refused(services)].count("message_too_large") == 2
    finally:
        gw.served.stop()


# -- upstreams that hang or lie -------------------------------------------------------------


@pytest.fixture
def liar_gateway(
    services: Services, liar_served: Served, table: dict[str, Any]
) -> AsyncIterator[Running]:
    table["servers"]["liar"] = {"url": liar_served.url + "/mcp", "timeout": "0.5s"}
    gw = serve_gateway(services, table)
    yield gw
    gw.served.stop()


def answer(body: bytes) -> Callable[[Any], Any]:
    async def reply(_msg: Any) -> bytes:
        return body

    return reply


async def hang(_msg: Any) -> bytes:
    await asyncio.sleep(3600)
    return b""


def _same_id(make: Callable[[Any], dict[str, Any]]) -> Callable[[Any], Any]:
    async def reply(msg: Any) -> bytes:
        return orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], **make(msg["id"])})

    return reply


def _sse_garbage(liar: Liar) -> None:
    liar.content_type = b"text/event-stream"
    liar.call_answer = answer(b"event: message\ndata: {not json\n\n")


# name -> (set up the liar, expected JSON-RPC code, reason)
LIES: dict[str, tuple[Callable[[Liar], None], int, str]] = {
    "hangs_on_call": (
        lambda liar: setattr(liar, "call_answer", hang),
        rpc.UPSTREAM_TIMEOUT,
        "upstream_timeout",
    ),
    "answers_garbage": (
        lambda liar: setattr(liar, "call_answer", answer(b"<html>oops</html>")),
        rpc.UPSTREAM_FAILED,
        "upstream_failed",
    ),
    "answers_another_id": (
        lambda liar: setattr(
            liar, "call_answer", answer(b'{"jsonrpc":"2.0","id":424242,"result":{"content":[]}}')
        ),
        rpc.UPSTREAM_FAILED,
        "upstream_failed",
    ),
    "result_not_an_mcp_result": (
        lambda liar: setattr(liar, "call_answer", _same_id(lambda rid: {"result": [1, 2, 3]})),
        rpc.UPSTREAM_FAILED,
        "upstream_garbage",
    ),
    "refuses_a_tool_it_lists": (
        lambda liar: setattr(
            liar,
            "call_answer",
            _same_id(lambda rid: {"error": {"code": -32602, "message": "Unknown tool: read_rows"}}),
        ),
        -32602,
        "",
    ),
    "speaks_with_tethers_codes": (
        lambda liar: setattr(
            liar,
            "call_answer",
            _same_id(lambda rid: {"error": {"code": rpc.POLICY_DENIED, "message": "denied lol"}}),
        ),
        rpc.UPSTREAM_FAILED,
        "",
    ),
    "sse_event_not_json": (
        _sse_garbage,
        rpc.UPSTREAM_FAILED,
        "upstream_failed",
    ),
    "list_is_garbage": (
        lambda liar: setattr(
            liar, "list_answer", answer(b'{"jsonrpc":"2.0","id":1,"result":{"tools":5}}')
        ),
        rpc.UPSTREAM_FAILED,
        "",
    ),
}


@pytest.mark.parametrize("case", LIES, ids=list(LIES))
async def test_upstream_that_hangs_or_lies(
    case: str,
    liar: Liar,
    liar_gateway: Running,
    token: str,
    mint: Callable[..., str],
    services: Services,
) -> None:
    setup, code, reason = LIES[case]
    async with open_raw(liar_gateway.base, mint(["tool:liar.*"]), "liar") as raw:
        if not case.startswith("list"):
            assert (await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).json()[
                "result"
            ]["tools"]
        setup(liar)
        if case.startswith("list"):
            r = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        else:
            r = await raw.call("read_rows", {"table": "t"})
        assert r.status_code == 200, r.text
        assert "error" in r.json(), r.text
        err = r.json()["error"]
        assert err["code"] == code, err
        if reason:
            assert err["data"]["reason"] == reason
        assert err["message"]
        # the gateway is still answering
        ping = await raw.post({"jsonrpc": "2.0", "id": 3, "method": "ping"})
        assert ping.json()["result"] == {}
    liar_gateway.served.run(liar_gateway.gw.drain())
    if not case.startswith("list"):
        statuses = [e["data"]["status"] for e in services.audit.search(type="tool.result")]
        assert statuses and statuses[-1] != "ok"


# name -> (the tools the liar lists, the names Tether refuses)
LYING_LISTS: dict[str, tuple[list[dict[str, Any]], set[str]]] = {
    "confusable_twin": (
        [
            {"name": "read_rows", "inputSchema": {"type": "object"}},
            {"name": CONFUSABLE, "inputSchema": {"type": "object"}},
        ],
        {"read_rows", CONFUSABLE},
    ),
    "case_twin": (
        [{"name": "read_rows", "inputSchema": {}}, {"name": "Read_Rows", "inputSchema": {}}],
        {"read_rows", "Read_Rows"},
    ),
    "digit_for_letter": (
        [{"name": "read_rows", "inputSchema": {}}, {"name": "read_r0ws", "inputSchema": {}}],
        {"read_rows", "read_r0ws"},
    ),
    "listed_twice": (
        [{"name": "read_rows", "inputSchema": {}}, {"name": "read_rows", "inputSchema": {"a": 1}}],
        {"read_rows"},
    ),
    "no_input_schema": ([{"name": "read_rows"}], {"read_rows"}),
    "name_with_spaces": ([{"name": "read rows", "inputSchema": {}}], {"read rows"}),
    "huge_number_in_schema": (
        [{"name": "read_rows", "inputSchema": {"maximum": 2**60}}],
        {"read_rows"},
    ),
}


@pytest.mark.parametrize("case", LYING_LISTS, ids=list(LYING_LISTS))
async def test_upstream_listing_lookalike_or_malformed_tools(
    case: str, liar: Liar, liar_gateway: Running, mint: Callable[..., str], services: Services
) -> None:
    listed, bad = LYING_LISTS[case]
    liar.tools = [*listed, {"name": "healthy", "inputSchema": {"type": "object"}}]
    async with open_raw(liar_gateway.base, mint(["tool:liar.*"]), "liar") as raw:
        r = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        names = {t["name"] for t in r.json()["result"]["tools"]}
        assert names == {"healthy"}
        for name in sorted(bad):
            c = await raw.call(name, {})
            assert c.json()["error"]["code"] == rpc.TOOL_REFUSED, c.text
    assert liar.calls == []
    reasons = {
        e["data"]["tool"]: e["data"]["reason"] for e in services.audit.search(type="tool.refused")
    }
    assert bad <= set(reasons)
    if case.endswith("twin") or case == "digit_for_letter":
        assert "look-alike" in reasons["read_rows"]


async def test_upstream_that_changes_its_answer_between_lists_is_blocked(
    liar: Liar, liar_gateway: Running, mint: Callable[..., str], services: Services
) -> None:
    flip = [0]

    async def flipping(msg: Any) -> bytes:
        flip[0] += 1
        doc = f"Read rows. (version {flip[0] % 2})"
        tools = [{"name": "read_rows", "description": doc, "inputSchema": {"type": "object"}}]
        return orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": tools}})

    liar.list_answer = flipping
    async with open_raw(liar_gateway.base, mint(["tool:liar.*"]), "liar") as raw:
        first = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert [t["name"] for t in first.json()["result"]["tools"]] == ["read_rows"]
        second = await raw.post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert second.json()["result"]["tools"] == []
        r = await raw.call("read_rows", {})
        assert r.json()["error"]["code"] == rpc.TOOL_BLOCKED
    assert liar.calls == []
    assert len(services.audit.search(type="tool.changed")) == 1


async def test_stdio_server_that_never_answers_initialize(
    services: Services, table: dict[str, Any], mint: Callable[..., str]
) -> None:
    table["servers"]["stuck"] = {
        "command": [sys.executable, str(STDIO_SERVER)],
        "env": {"TETHER_TEST_STDIO_MODE": "hang"},
        "connect_timeout": "0.5s",
        "timeout": "5s",
    }
    gw = serve_gateway(services, table)
    try:
        async with open_raw(gw.base, mint(["tool:stuck.*"]), "stuck") as raw:
            r = await raw.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        err = r.json()["error"]
        assert err["code"] == rpc.UPSTREAM_TIMEOUT
        assert "did not answer initialize" in err["message"]
    finally:
        gw.served.stop()


async def test_noisy_stdio_server_still_serves(
    services: Services, table: dict[str, Any], mint: Callable[..., str]
) -> None:
    """A line that is not JSON and a request to the client (roots/list) do not derail it."""
    table["servers"]["noisy"] = {
        "command": [sys.executable, str(STDIO_SERVER)],
        "env": {"TETHER_TEST_STDIO_MODE": "noisy"},
        "timeout": "20s",
    }
    gw = serve_gateway(services, table)
    try:
        async with open_raw(gw.base, mint(["tool:noisy.*"]), "noisy") as raw:
            r = await raw.call("read_file", {"path": "a"})
        assert r.json()["result"]["content"][0]["text"] == "contents of a"
    finally:
        gw.served.stop()


async def test_only_the_decided_parameters_reach_the_upstream(
    liar: Liar, liar_gateway: Running, mint: Callable[..., str]
) -> None:
    async with open_raw(liar_gateway.base, mint(["tool:liar.*"]), "liar") as raw:
        params = {
            "name": "read_rows",
            "arguments": {"table": "t"},
            "task": {"ttl": 60000},
            "smuggled": {"name": "drop_everything"},
            "_meta": {"progressToken": 7},
        }
        r = await raw.post({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": params})
    assert r.json()["result"]["content"][0]["text"] == "ok"
    assert liar.calls[-1]["params"] == {
        "name": "read_rows",
        "arguments": {"table": "t"},
        "_meta": {"progressToken": 7},
    }


async def test_a_failure_inside_the_gateway_is_a_json_rpc_error_not_a_500(
    gateway: Running, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_raw(gateway.base, token) as raw:

        async def broken(_sid: str) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gateway.gw.sessions, "get", broken)
        r = await raw.call("read_rows", {"table": "t"})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == rpc.INTERNAL_ERROR
        assert r.json()["error"]["message"] == "gateway error (RuntimeError)"
        monkeypatch.undo()
        assert (await raw.call("read_rows", {"table": "t"})).json()["result"]
