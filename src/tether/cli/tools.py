"""``tether tools ls | show | approve``: the MCP gateway's pinned tool definitions.

A tool whose definition changed since it was approved (or, with ``pin = "approve"``, one never
approved) is blocked for agents until a person looks at it and approves it here. ``show``
prints the diff; ``approve`` approves exactly the definition ``show`` printed (its sha256 is
sent along, so a server that changes it again in between is not approved by accident).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.cli.client import ApiClient, read_token_file
from tether.config import DataDir, resolve_data_dir
from tether.errors import TetherError

__all__ = ["tools_app"]

tools_app = typer.Typer(
    help="Pinned MCP tool definitions: list them, see what changed, re-approve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="TETHER_HOME", help="Data directory (default ~/.tether)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Act with the token in this file ('-': stdin), not as the user."),
]
_STATE = {"approved": "green", "changed": "bold red", "new": "yellow"}


def _fail(e: TetherError) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(e.diagnostics())}")
    raise typer.Exit(1)


def _call(
    data_dir: Path | None,
    token_file: str | None,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, Any] | None = None,
) -> Any:
    client = ApiClient(DataDir(resolve_data_dir(data_dir)))
    try:
        token = read_token_file(token_file) if token_file else client.user_token()
        return client.request(method, path, token=token, json_body=json_body, params=params)
    except TetherError as e:
        _fail(e)
    finally:
        client.close()


def _when(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _state(state: str) -> str:
    style = _STATE.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def _short(sha: Any) -> str:
    return str(sha)[:12] if sha else "-"


@tools_app.command("ls")
def ls(
    server: Annotated[str | None, typer.Option(help="Only this MCP server.")] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Every tool the gateway has seen, and whether agents may use it."""
    doc = _call(data_dir, token, "GET", "/v1/tools", params={"server": server} if server else None)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    t = Table("server", "tool", "state", "approved", "waiting", "approved by", header_style="bold")
    for p in doc["tools"]:
        t.add_row(
            escape(p["server"]),
            escape(p["tool"]),
            _state(p["state"]),
            _short(p.get("approved_sha256")),
            _short(p.get("pending_sha256")),
            escape(str(p.get("approved_by") or "-")),
        )
    out.print(t)
    blocked = [p for p in doc["tools"] if p["state"] != "approved"]
    if not doc["tools"]:
        err.print("no tools seen yet" + (f" on {server}" if server else ""))
    elif blocked:
        err.print(
            f"{len(blocked)} blocked: tether tools show SERVER TOOL, then "
            "tether tools approve SERVER TOOL"
        )


@tools_app.command("show")
def show(
    server: Annotated[str, typer.Argument(help="The MCP server (as in /mcp/SERVER).")],
    tool: Annotated[str, typer.Argument(help="The tool's name.")],
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """One tool: its state, and the diff between the approved and the waiting definition."""
    doc = _call(data_dir, token, "GET", f"/v1/tools/{server}/{tool}")
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    t = Table(show_header=False, box=None)
    t.add_row("tool", f"[bold]{escape(doc['server'])}.{escape(doc['tool'])}[/]")
    t.add_row("state", _state(doc["state"]))
    t.add_row("approved", f"{doc.get('approved_sha256') or '-'}")
    t.add_row("approved by", escape(str(doc.get("approved_by") or "-")))
    t.add_row("approved at", _when(doc.get("approved_ms")))
    if doc.get("pending_sha256"):
        t.add_row("waiting", doc["pending_sha256"])
        t.add_row("seen at", _when(doc.get("pending_ms")))
        t.add_row("changed", escape(", ".join(doc.get("changed_fields") or [])))
    out.print(t)
    if doc.get("diff"):
        out.print()
        for line in str(doc["diff"]).splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
            out.print(f"[{style}]{escape(line)}[/]" if style else escape(line))


@tools_app.command("approve")
def approve(
    server: Annotated[str, typer.Argument(help="The MCP server (as in /mcp/SERVER).")],
    tool: Annotated[str, typer.Argument(help="The tool's name.")],
    sha256: Annotated[
        str | None,
        typer.Option(
            "--sha256",
            help="Approve only this waiting definition (default: the one shown right now).",
        ),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Approve the waiting definition of a tool, so agents may use it again. Recorded."""
    if sha256 is None:
        current = _call(data_dir, token, "GET", f"/v1/tools/{server}/{tool}")
        sha256 = current.get("pending_sha256")
        if not sha256:
            err.print(f"{server}.{tool} has nothing waiting for approval ({current['state']})")
            raise typer.Exit(1)
    doc = _call(
        data_dir,
        token,
        "POST",
        f"/v1/tools/{server}/{tool}/approve",
        json_body={"sha256": sha256},
    )
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(
            f"[green]approved[/] {escape(server)}.{escape(tool)} "
            f"sha256:{_short(doc.get('approved_sha256'))}"
        )
