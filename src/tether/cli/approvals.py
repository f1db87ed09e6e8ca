"""``tether approvals ls | show | approve | deny`` and ``tether request``, through the API.

Commands act as the local user (the data dir's credential, like every other command) or, with
``--token FILE``, as the identity whose token is in FILE: a reviewer agent approves, or an
agent asks for just-in-time grants, with its own token.
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

__all__ = ["approvals_app", "request_cmd"]

approvals_app = typer.Typer(
    help="Decide escalated actions and just-in-time grant requests.",
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
_STATE_STYLE = {
    "pending": "yellow",
    "approved": "green",
    "denied": "bold red",
    "expired": "dim",
    "used": "dim",
}


def _fail(e: TetherError) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(e.diagnostics())}")
    raise typer.Exit(1)


def _client(data_dir: Path | None) -> ApiClient:
    return ApiClient(DataDir(resolve_data_dir(data_dir)))


def _call(
    data_dir: Path | None,
    token_file: str | None,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, Any] | None = None,
) -> Any:
    client = _client(data_dir)
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


def _state(doc: dict[str, Any]) -> str:
    state = str(doc.get("state", "?"))
    style = _STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def _what(doc: dict[str, Any]) -> str:
    s = doc.get("summary") or {}
    if doc.get("kind") == "grants":
        return "grants " + ", ".join(s.get("grants", []))
    return f"{s.get('type', '?')} {s.get('resource', '')}"


def _short_id(spiffe: str) -> str:
    return spiffe.split("/", 3)[-1] if spiffe.startswith("spiffe://") else spiffe


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _print_one(doc: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None)
    t.add_row("id", f"[bold]{escape(doc['id'])}[/]")
    t.add_row("state", _state(doc))
    t.add_row("kind", escape(str(doc.get("kind"))))
    t.add_row("requester", escape(doc["requester"]))
    if doc.get("chain"):
        t.add_row("chain", escape(" -> ".join(doc["chain"])))
    if doc.get("task"):
        t.add_row("task", escape(str(doc["task"])))
    t.add_row("what", escape(_what(doc)))
    s = doc.get("summary") or {}
    if "arguments" in s:
        t.add_row("arguments", escape(json.dumps(s["arguments"], sort_keys=True)[:2000]))
    elif "arguments_sha256" in s:
        t.add_row("arguments", f"sha256:{s['arguments_sha256']} ({s.get('arguments_bytes')} bytes)")
    if doc.get("kind") == "grants":
        t.add_row("reason", escape(str(s.get("reason", ""))))
        t.add_row("ttl", f"{s.get('ttl_s', '?')}s once approved")
    elif doc.get("reasons"):
        t.add_row("reasons", escape("; ".join(doc["reasons"])))
    t.add_row("quorum", escape(doc["quorum"]))
    if doc.get("missing"):
        t.add_row("needs", f"[yellow]{escape(doc['missing'])}[/]")
    t.add_row("created", _when(doc.get("created_ms")))
    if "expires_ms" in doc:
        t.add_row("expires", _when(doc["expires_ms"]))
    if "valid_until_ms" in doc:
        t.add_row("valid until", _when(doc["valid_until_ms"]))
    if doc.get("kind") == "action" and doc.get("state") in ("approved", "used"):
        t.add_row("uses", f"{doc.get('used', 0)} of {doc.get('uses', 1)} used")
    if doc.get("decided_reason"):
        t.add_row("decision", escape(doc["decided_reason"]))
    t.add_row("policy version", escape(str(doc.get("policy_version"))))
    out.print(t)
    votes = doc.get("votes") or []
    if votes:
        v = Table("approver", "vote", "when", "comment", header_style="bold")
        for vote in votes:
            style = "green" if vote["vote"] == "approve" else "red"
            v.add_row(
                escape(vote["approver"]),
                f"[{style}]{vote['vote']}[/]",
                _when(vote.get("at_ms")),
                escape(vote.get("comment", "")),
            )
        out.print(v)


@approvals_app.command("ls")
def ls(
    state: Annotated[
        str | None, typer.Option(help="pending, approved, denied, expired or used")
    ] = "pending",
    kind: Annotated[str | None, typer.Option(help="action or grants")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every state.")] = False,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List approval requests (pending ones by default)."""
    params: dict[str, Any] = {}
    if state and not all_:
        params["state"] = state
    if kind:
        params["kind"] = kind
    doc = _call(data_dir, token, "GET", "/v1/approvals", params=params or None)
    if as_json:
        _print_json(doc)
        return
    t = Table("state", "requester", "what", "quorum / needs", "created", header_style="bold")
    # ids are what people copy into `approve`: never truncated, whatever the terminal width
    t.add_column("id", no_wrap=True, min_width=24)
    for a in doc["approvals"]:
        needs = a.get("missing") or a["quorum"]
        t.add_row(
            _state(a),
            escape(_short_id(a["requester"])),
            escape(_what(a)),
            escape(needs),
            _when(a.get("created_ms")),
            escape(a["id"]),
        )
    out.print(t)
    if not doc["approvals"]:
        err.print("no approval requests" + (f" in state {state}" if params.get("state") else ""))


@approvals_app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(help="apr_... or jit_...")],
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Show one request: what it is for, its quorum, its votes and what it still needs."""
    doc = _call(data_dir, token, "GET", f"/v1/approvals/{request_id}")
    if as_json:
        _print_json(doc)
    else:
        _print_one(doc)


@approvals_app.command("approve")
def approve(
    request_id: Annotated[str, typer.Argument(help="apr_... or jit_...")],
    uses: Annotated[
        int | None, typer.Option(min=1, max=100, help="How many times it may be used.")
    ] = None,
    comment: Annotated[str, typer.Option(help="Recorded with your vote.")] = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Vote to approve; the request is approved once its quorum is met."""
    body: dict[str, Any] = {"comment": comment}
    if uses is not None:
        body["uses"] = uses
    doc = _call(data_dir, token, "POST", f"/v1/approvals/{request_id}/approve", json_body=body)
    if as_json:
        _print_json(doc)
    elif doc["state"] == "approved":
        out.print(f"[green]approved[/] {escape(doc['id'])}")
    else:
        out.print(f"vote recorded on {escape(doc['id'])}; needs {escape(doc.get('missing', ''))}")


@approvals_app.command("deny")
def deny(
    request_id: Annotated[str, typer.Argument(help="apr_... or jit_...")],
    reason: Annotated[str, typer.Option(help="Why (shown to the requester, recorded).")],
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Deny the request (one eligible approver's deny decides it)."""
    doc = _call(
        data_dir,
        token,
        "POST",
        f"/v1/approvals/{request_id}/deny",
        json_body={"reason": reason},
    )
    if as_json:
        _print_json(doc)
    else:
        out.print(f"[red]denied[/] {escape(doc['id'])}")


def request_cmd(
    grant: Annotated[
        list[str], typer.Option("--grant", help="KIND:PATTERN to ask for, repeatable.")
    ],
    reason: Annotated[str, typer.Option(help="Why: approvers decide on it.")],
    ttl: Annotated[str, typer.Option(help="How long the grants last once approved, e.g. 30m.")],
    task: Annotated[
        str | None, typer.Option(help="Only for this task (default: the token's task).")
    ] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Ask for just-in-time grants; an approver decides (tether approvals approve ID)."""
    body: dict[str, Any] = {"grants": grant, "reason": reason, "ttl": ttl}
    if task:
        body["task"] = task
    doc = _call(data_dir, token, "POST", "/v1/grants/requests", json_body=body)
    if as_json:
        _print_json(doc)
        return
    if doc["state"] == "approved":
        out.print(
            f"[green]already approved[/]: {escape(doc['id'])} covers this "
            f"(valid until {_when(doc.get('valid_until_ms'))})"
        )
    else:
        out.print(
            f"requested {escape(doc['id'])} ({_state(doc)}); needs "
            f"{escape(doc.get('missing') or doc['quorum'])}"
        )
