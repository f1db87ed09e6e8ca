"""The bundled SQL MCP server with the official ``mcp`` SDK client: in process, over stdio
(``python -m tether.toolbox.sql``) and over streamable HTTP (the same command with
``--transport http``), on a real SQLite file seeded with the churn demo data."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult

from tether.toolbox.demo_data import INJECTED_CUSTOMER, INJECTION, seed_demo
from tether.toolbox.sql import READ_TOOLS, WRITE_TOOLS, build_server
from tether.toolbox.sqldb import Database


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "churn.db"
    db = Database(path)
    try:
        seed_demo(db.writer)
    finally:
        db.close()
    return path


@pytest.fixture
def demo_path(demo_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "churn.db"
    shutil.copy(demo_template, path)
    return path


@pytest.fixture
def db(demo_path: Path) -> Iterator[Database]:
    d = Database(demo_path, query_timeout=2.0)
    yield d
    d.close()


@asynccontextmanager
async def connect(db: Database) -> AsyncIterator[Client]:
    # not a fixture: the client's task group must open and close in the test's own task
    async with asyncio.timeout(60), Client(build_server(db)) as c:
        yield c


def _sqlite(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _snapshot(path: Path) -> list[tuple[Any, ...]]:
    """The schema and every table's row count: what a write would change."""
    schema = _sqlite(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    counts = [
        (t, _sqlite(path, f"SELECT COUNT(*) FROM {t}")[0][0])
        for t in ("customers", "subscriptions", "events")
    ]
    return [*schema, *counts]


def _error_text(r: CallToolResult) -> str:
    assert r.is_error, r
    return " ".join(getattr(c, "text", "") for c in r.content)


# -- tools and schemas ------------------------------------------------------------------------


async def test_tools_annotated_with_input_schemas(db: Database) -> None:
    async with connect(db) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {*READ_TOOLS, *WRITE_TOOLS}
        for name in READ_TOOLS:
            assert tools[name].annotations is not None
            assert tools[name].annotations.read_only_hint is True
        ci, ins, ex = tools["create_index"], tools["insert_rows"], tools["execute_write"]
        assert ci.annotations and ci.annotations.read_only_hint is False
        assert ci.annotations.destructive_hint is False and ci.annotations.idempotent_hint is True
        assert ins.annotations and ins.annotations.destructive_hint is False
        assert ex.annotations and ex.annotations.destructive_hint is True
        assert tools["query"].input_schema["required"] == ["sql"]
        assert tools["create_index"].input_schema["properties"]["columns"]["type"] == "array"
        assert set(tools["create_index"].input_schema["required"]) == {"table", "columns"}
        assert tools["query"].output_schema is not None


async def test_read_only_server_offers_no_write_tool(db: Database) -> None:
    async with Client(build_server(db, read_only=True)) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert names == set(READ_TOOLS)
        r = await c.call_tool("create_index", {"table": "events", "columns": ["type"]})
        assert r.is_error


# -- reads ----------------------------------------------------------------------------------------


async def test_reads(db: Database) -> None:
    async with connect(db) as client:
        tables = (await client.call_tool("list_tables", {})).structured_content
        assert [t["name"] for t in tables["tables"]] == ["customers", "events", "subscriptions"]
        assert {t["name"]: t["rows"] for t in tables["tables"]}["customers"] == 200
        desc = (
            await client.call_tool("describe_table", {"table": "subscriptions"})
        ).structured_content
        cols = {c["name"]: c for c in desc["columns"]}
        assert cols["id"]["primary_key"] and not cols["plan"]["nullable"]
        assert desc["foreign_keys"] == [{"columns": ["customer_id"], "references": "customers(id)"}]
        r = await client.call_tool(
            "query",
            {"sql": "SELECT id, name FROM customers WHERE id = :id", "params": {"id": 7}},
        )
        assert r.structured_content["rows"] == [
            {"id": 7, "name": r.structured_content["rows"][0]["name"]}
        ]
        capped = await client.call_tool("query", {"sql": "SELECT id FROM customers", "limit": 5})
        assert (
            capped.structured_content["row_count"] == 5 and capped.structured_content["truncated"]
        )


async def test_churn_report_and_the_planted_injection_is_just_data(db: Database) -> None:
    async with connect(db) as client:
        r = await client.call_tool(
            "query",
            {
                "sql": """
                SELECT s.status,
                       COUNT(DISTINCT s.customer_id) AS customers,
                       1.0 * SUM(e.type = 'login') / COUNT(DISTINCT s.customer_id) AS logins,
                       1.0 * SUM(e.type = 'support_ticket') / COUNT(DISTINCT s.customer_id)
                           AS tickets
                FROM subscriptions s JOIN events e ON e.customer_id = s.customer_id
                GROUP BY s.status ORDER BY s.status
                """
            },
        )
        active, canceled = r.structured_content["rows"]
        assert (active["status"], canceled["status"]) == ("active", "canceled")
        assert active["customers"] + canceled["customers"] == 200
        assert 0.15 < canceled["customers"] / 200 < 0.35
        assert canceled["logins"] < active["logins"] and canceled["tickets"] > active["tickets"]
        note = await client.call_tool(
            "query", {"sql": f"SELECT notes FROM customers WHERE id = {INJECTED_CUSTOMER}"}
        )
        assert note.structured_content["rows"] == [{"notes": INJECTION}]


# -- writes really happen -------------------------------------------------------------------------


async def test_writes_change_the_database(db: Database, demo_path: Path) -> None:
    async with connect(db) as client:
        r = await client.call_tool(
            "create_index", {"table": "events", "columns": ["customer_id", "type"]}
        )
        assert not r.is_error and r.structured_content["created"] is True
        names = [row[1] for row in _sqlite(demo_path, "PRAGMA index_list(events)")]
        assert "ix_events_customer_id_type" in names
        again = await client.call_tool(
            "create_index", {"table": "events", "columns": ["customer_id", "type"]}
        )
        assert again.structured_content["created"] is False
        r = await client.call_tool(
            "insert_rows",
            {
                "table": "events",
                "rows": [
                    {"customer_id": 1, "type": "login", "occurred_at": "2026-01-02"},
                    {"customer_id": 2, "type": "login", "occurred_at": "2026-01-02"},
                ],
            },
        )
        assert r.structured_content == {"table": "events", "inserted": 2}
        assert _sqlite(
            demo_path, "SELECT COUNT(*) FROM events WHERE occurred_at = '2026-01-02'"
        ) == [(2,)]
        r = await client.call_tool(
            "execute_write",
            {"sql": "UPDATE customers SET notes = :n WHERE id = 1", "params": {"n": "called"}},
        )
        assert r.structured_content == {"rowcount": 1}
        assert _sqlite(demo_path, "SELECT notes FROM customers WHERE id = 1") == [("called",)]


# Statements that would write, as `query` might be handed them. No regex stands between them and
# the database: each reaches SQLite, which refuses it on the read-only connection.
WRITES_VIA_QUERY = {
    "delete": "DELETE FROM events",
    "lower-case-update": "update customers set notes = 'x'",
    "comment-disguised": "/* SELECT */ DELETE FROM customers WHERE id = 1",
    "insert-in-cte": "WITH x AS (SELECT 1) INSERT INTO events (customer_id, type, occurred_at) "
    "SELECT 1, 'login', '2026-01-03' FROM x",
    "create-index": "CREATE INDEX ix_sneaky ON events (type)",
    "drop-table": "DROP TABLE events",
    "create-temp-table": "CREATE TEMP TABLE t AS SELECT * FROM customers",
    "pragma-query-only-off": "PRAGMA query_only = OFF",
    "pragma-journal": "PRAGMA journal_mode = DELETE",
    "attach-new-file": "ATTACH DATABASE 'ATTACHED' AS other",
    "vacuum-into": "VACUUM INTO 'ATTACHED'",
}


@pytest.mark.parametrize("sql", WRITES_VIA_QUERY.values(), ids=WRITES_VIA_QUERY.keys())
async def test_a_write_via_query_is_refused_by_the_database(
    db: Database, demo_path: Path, tmp_path: Path, sql: str
) -> None:
    async with connect(db) as client:
        attached = tmp_path / "attached.db"
        before = _snapshot(demo_path)
        r = await client.call_tool("query", {"sql": sql.replace("ATTACHED", str(attached))})
        text = _error_text(r)
        assert "the database refused" in text
        assert any(m in text for m in ("readonly", "not authorized", "authorization denied")), text
        assert _snapshot(demo_path) == before
        assert not attached.exists()
        # the connection is still read-only for the next call (a refused PRAGMA changed nothing)
        again = await client.call_tool("query", {"sql": "DELETE FROM events"})
        assert "readonly" in _error_text(again)


async def test_the_same_text_passes_where_writes_are_allowed(db: Database, demo_path: Path) -> None:
    """What stopped the CTE insert above was the connection, not the text of the SQL."""
    async with connect(db) as client:
        sql = WRITES_VIA_QUERY["insert-in-cte"]
        r = await client.call_tool("execute_write", {"sql": sql})
        assert not r.is_error and r.structured_content == {"rowcount": 1}
        assert _sqlite(
            demo_path, "SELECT COUNT(*) FROM events WHERE occurred_at = '2026-01-03'"
        ) == [(1,)]


def test_the_read_engine_itself_refuses_writes(db: Database) -> None:
    with db.reader.connect() as conn, pytest.raises(Exception, match="readonly"):
        conn.exec_driver_sql(
            "INSERT INTO events (customer_id, type, occurred_at) VALUES (1, 'x', 'y')"
        )


# -- bad input ------------------------------------------------------------------------------------

BAD_CALLS: dict[str, tuple[str, dict[str, Any], str]] = {
    "unknown-table": ("describe_table", {"table": "nope"}, "no table named 'nope'"),
    "index-unknown-table": ("create_index", {"table": "nope", "columns": ["a"]}, "no table"),
    "index-unknown-column": ("create_index", {"table": "events", "columns": ["nope"]}, "no column"),
    "index-injection-in-name": (
        "create_index",
        {"table": "events", "columns": ["type"], "name": "x; DROP TABLE customers"},
        "invalid index name",
    ),
    "index-injection-in-column": (
        "create_index",
        {"table": "events", "columns": ['type"); DROP TABLE customers; --']},
        "no column",
    ),
    "index-no-columns": ("create_index", {"table": "events", "columns": []}, ""),
    "insert-unknown-column": (
        "insert_rows",
        {"table": "events", "rows": [{"nope": 1}]},
        "no column 'nope'",
    ),
    "insert-violates-constraint": (
        "insert_rows",
        {
            "table": "customers",
            "rows": [
                {"name": "a", "email": "fresh@example.com", "country": "US", "signup_date": "x"},
                {"name": "b", "email": "fresh@example.com", "country": "US", "signup_date": "x"},
            ],
        },
        "UNIQUE",
    ),
    "insert-no-rows": ("insert_rows", {"table": "events", "rows": []}, ""),
    "query-syntax": ("query", {"sql": "SELEC 1"}, "syntax error"),
    "query-two-statements": ("query", {"sql": "SELECT 1; DELETE FROM events"}, "one statement"),
    "query-missing-param": ("query", {"sql": "SELECT :x", "params": {"y": 1}}, "refused"),
    "query-limit-too-big": ("query", {"sql": "SELECT 1", "limit": 100000}, ""),
    "query-wrong-type": ("query", {"sql": 5}, ""),
    "write-two-statements": (
        "execute_write",
        {"sql": "DELETE FROM events; DROP TABLE customers"},
        "one statement",
    ),
    "query-runs-too-long": (
        "query",
        {
            "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT COUNT(*) FROM c"
        },
        "time limit",
    ),
}


@pytest.mark.parametrize("tool,args,why", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_bad_calls_are_tool_errors(
    db: Database, demo_path: Path, tool: str, args: dict[str, Any], why: str
) -> None:
    async with connect(db) as client:
        before = _snapshot(demo_path)
        r = await client.call_tool(tool, args)
        assert why in _error_text(r)
        assert _snapshot(demo_path) == before  # all or nothing
        ok = await client.call_tool("query", {"sql": "SELECT COUNT(*) AS n FROM customers"})
        assert ok.structured_content["rows"] == [{"n": 200}]


# -- transports: the real command over stdio and streamable HTTP -----------------------------------

SQL_CMD = [sys.executable, "-m", "tether.toolbox.sql"]


async def test_over_stdio(demo_path: Path) -> None:
    params = StdioServerParameters(command=SQL_CMD[0], args=[*SQL_CMD[1:], "--db", str(demo_path)])
    async with asyncio.timeout(60), Client(params) as c:
        assert {t.name for t in (await c.list_tools()).tools} == {*READ_TOOLS, *WRITE_TOOLS}
        r = await c.call_tool("query", {"sql": "SELECT COUNT(*) AS n FROM subscriptions"})
        assert r.structured_content["rows"] == [{"n": 200}]
        w = await c.call_tool("create_index", {"table": "customers", "columns": ["country"]})
        assert w.structured_content["created"] is True
        refused = await c.call_tool("query", {"sql": "DROP INDEX ix_customers_country"})
        assert "readonly" in _error_text(refused)
    assert "ix_customers_country" in [
        r[1] for r in _sqlite(demo_path, "PRAGMA index_list(customers)")
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_over_streamable_http(demo_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [*SQL_CMD, "--db", str(demo_path), "--transport", "http", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            async with Client(f"http://127.0.0.1:{port}/mcp") as c:
                r = await c.call_tool("list_tables", {})
                assert len(r.structured_content["tables"]) == 3
                w = await c.call_tool(
                    "insert_rows",
                    {
                        "table": "events",
                        "rows": [{"customer_id": 3, "type": "login", "occurred_at": "2026-02-01"}],
                    },
                )
                assert w.structured_content["inserted"] == 1
                refused = await c.call_tool("query", {"sql": "DELETE FROM events"})
                assert "readonly" in _error_text(refused)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    assert _sqlite(demo_path, "SELECT COUNT(*) FROM events WHERE occurred_at = '2026-02-01'") == [
        (1,)
    ]


# -- the demo data and the command line ------------------------------------------------------


def test_seed_demo_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    counts = []
    for name in ("a.db", "b.db"):
        d = Database(tmp_path / name)
        try:
            counts.append(seed_demo(d.writer))
            assert seed_demo(d.writer) == counts[-1]  # a second run adds nothing
        finally:
            d.close()
    assert counts[0] == counts[1]
    assert counts[0]["customers"] == 200 and counts[0]["events"] > 1000
    dump = [_sqlite(tmp_path / n, "SELECT * FROM events ORDER BY id") for n in ("a.db", "b.db")]
    assert dump[0] == dump[1]


@pytest.mark.parametrize(
    "db,why",
    [("/nonexistent-dir/x.db", "no directory"), ("mysql://u@h/db", "only SQLite")],
    ids=["missing-directory", "unsupported-url"],
)
def test_cli_refuses_bad_targets(db: str, why: str) -> None:
    proc = subprocess.run(
        [*SQL_CMD, "--db", db], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2 and why in proc.stderr


def test_cli_seed_only(tmp_path: Path) -> None:
    path = tmp_path / "seeded.db"
    proc = subprocess.run(
        [*SQL_CMD, "--db", str(path), "--seed-demo", "--seed-only"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stdout belongs to the protocol
    assert _sqlite(path, "SELECT COUNT(*) FROM customers") == [(200,)]


@pytest.mark.skipif(
    not os.environ.get("TETHER_TEST_POSTGRES_URL"),
    reason="set TETHER_TEST_POSTGRES_URL (and install psycopg) to test PostgreSQL live",
)
async def test_postgresql_reads_are_read_only() -> None:  # pragma: no cover - needs a server
    d = Database(os.environ["TETHER_TEST_POSTGRES_URL"])
    try:
        d.execute_write("CREATE TABLE IF NOT EXISTS tether_probe (id INTEGER PRIMARY KEY)")
        async with Client(build_server(d)) as c:
            r = await c.call_tool("query", {"sql": "INSERT INTO tether_probe VALUES (1)"})
            assert "read-only" in _error_text(r)
            ok = await c.call_tool("create_index", {"table": "tether_probe", "columns": ["id"]})
            assert not ok.is_error
    finally:
        d.execute_write("DROP TABLE IF EXISTS tether_probe")
        d.close()
