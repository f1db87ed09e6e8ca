"""``tether usage``: LLM token usage and cost by identity, task, delegation root or model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tether.cli.client import ApiClient, read_token_file
from tether.config import DataDir, resolve_data_dir
from tether.errors import TetherError

__all__ = ["usage_cmd"]

out = Console()
err = Console(stderr=True)


def usage_cmd(
    by: Annotated[
        str, typer.Option("--by", help="Group by identity, task, root or model.")
    ] = "identity",
    identity: Annotated[str | None, typer.Option("--identity", help="Only this SPIFFE ID.")] = None,
    root: Annotated[str | None, typer.Option("--root", help="Only this delegation root.")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Token file (default: you).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="TETHER_HOME", help="Data directory."),
    ] = None,
) -> None:
    """Token usage and cost recorded by the LLM gateway."""
    if by not in ("identity", "task", "root", "model"):
        err.print("[bold red]error:[/] --by must be identity, task, root or model")
        raise typer.Exit(2)
    client = ApiClient(DataDir(resolve_data_dir(data_dir)))
    try:
        tok = read_token_file(token) if token else client.user_token()
        params = {
            "by": by,
            **({"identity": identity} if identity else {}),
            **({"root": root} if root else {}),
        }
        doc = client.request("GET", "/v1/usage", token=tok, params=params)
    except TetherError as e:
        err.print(f"[bold red]error:[/] {e.diagnostics()}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        client.close()
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    t = Table(title=f"LLM usage by {by}")
    for col in (by, "requests", "input", "output", "total", "usd"):
        t.add_column(col, justify="left" if col == by else "right")
    for r in doc["usage"]:
        t.add_row(
            str(r[by] or "-"),
            str(r["requests"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            str(r["total_tokens"]),
            str(r["usd"]),
        )
    out.print(t)
