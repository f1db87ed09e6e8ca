"""``tether``: initialise a data dir, run the server, delegate, inspect and revoke identities."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from tether.cli import audit as audit_cli
from tether.cli.approvals import approvals_app, request_cmd
from tether.cli.beam import beam_app, run_cmd
from tether.cli.client import ApiClient, read_token_file
from tether.cli.policy import policy_app
from tether.cli.tools import tools_app
from tether.cli.usage import usage_cmd
from tether.config import DataDir, resolve_data_dir, write_private
from tether.errors import TetherError
from tether.identity.exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_JWT

__all__ = ["app", "main"]

app = typer.Typer(
    name="tether",
    help="Tether: delegated identity, enforcement and tamper-evident audit for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
identities_app = typer.Typer(help="List the identities Tether knows.", no_args_is_help=True)
users_app = typer.Typer(help="Manage users (humans).", no_args_is_help=True)
svid_app = typer.Typer(help="Obtain SVIDs.", no_args_is_help=True)
app.add_typer(identities_app, name="identities")
app.add_typer(users_app, name="users")
app.add_typer(svid_app, name="svid")
app.add_typer(audit_cli.app, name="audit", help="Inspect and verify the tamper-evident audit log.")
app.add_typer(policy_app, name="policy")
app.add_typer(approvals_app, name="approvals")
app.command("request")(request_cmd)
app.command("usage")(usage_cmd)
app.command("run")(run_cmd)
app.add_typer(beam_app, name="beam")
app.add_typer(tools_app, name="tools")

out = Console()
err = Console(stderr=True)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="TETHER_HOME", help="Data directory (default ~/.tether)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(e: TetherError) -> NoReturn:
    err.print(f"[bold red]error:[/] {e.diagnostics()}", highlight=False)
    raise typer.Exit(1)


def _client(data_dir: Path | None) -> ApiClient:
    return ApiClient(DataDir(resolve_data_dir(data_dir)))


def _when(epoch: int | float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_identity(doc: dict[str, Any]) -> None:
    root = doc["chain"][0]["spiffe_id"] if doc["chain"] else doc["spiffe_id"]
    tree = Tree(f"[bold]{root}[/]" + ("  [dim](root)[/]" if doc["chain"] else ""))
    node = tree
    for link in doc["chain"][1:]:
        node = node.add(f"{link['spiffe_id']}  [dim]delegated[/]")
    if doc["chain"]:
        node.add(f"[bold green]{doc['spiffe_id']}[/]  [dim]<- this token[/]")
    out.print(tree)
    t = Table(show_header=False, box=None)
    t.add_row("token id", doc["token_id"])
    t.add_row("expires", _when(doc["expires_at"]))
    t.add_row("grants", ", ".join(doc["grants"]) or "(none)")
    if doc.get("task"):
        t.add_row("task", doc["task"])
    if doc.get("objective_sha256"):
        t.add_row("objective", f"sha256:{doc['objective_sha256']}")
    t.add_row("depth", str(len(doc["chain"])))
    out.print(t)


@app.command()
def init(
    trust_domain: Annotated[str, typer.Option("--trust-domain", help="e.g. example.org")],
    data_dir: DataDirOpt = None,
) -> None:
    """Create the data directory: config, keys (0600), store and the first admin user."""
    from tether.server.services import init_data_dir

    root = resolve_data_dir(data_dir)
    try:
        res = init_data_dir(root, trust_domain)
    except TetherError as e:
        fail(e)
    if res.created:
        out.print(f"initialised [bold]{root}[/] for trust domain [bold]{trust_domain}[/]")
    else:
        out.print(f"{root} already initialised for [bold]{res.config.trust_domain}[/]; keys kept")
    out.print(
        f"admin user: spiffe://{res.config.trust_domain}/user/{res.config.admin_user} "
        f"(credential in {res.admin_credential_path})"
    )


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default 127.0.0.1:7800)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the authority, API and audit log in one process (TCP and a unix socket)."""
    from tether.server.serve import serve as run

    root = resolve_data_dir(data_dir)
    try:
        cfg = DataDir(root).load_config()
        err.print(
            f"tether serving {cfg.trust_domain} on http://{listen or cfg.listen} "
            f"and unix:{DataDir(root).socket_path}"
        )
        run(root, listen, log_level)
    except TetherError as e:
        fail(e)


@app.command()
def delegate(
    agent: Annotated[str, typer.Option("--agent", help="Name of the agent to delegate to.")],
    grant: Annotated[
        list[str] | None, typer.Option("--grant", help="KIND:PATTERN, repeatable (model:gpt-4o*).")
    ] = None,
    ttl: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 30m (default from config).")
    ] = None,
    objective: Annotated[str | None, typer.Option(help="What the agent is to do.")] = None,
    task: Annotated[
        str | None, typer.Option(help="Task id (default: the grantor's, or new).")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Group label, repeatable; children keep their grantor's."),
    ] = None,
    from_token: Annotated[
        str | None, typer.Option("--from-token", help="Delegate from this agent token file.")
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the token here (0600).")
    ] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Issue a delegated JWT-SVID for an agent, with grants no wider than the grantor's."""
    client = _client(data_dir)
    try:
        grantor = read_token_file(from_token) if from_token else client.user_token()
        form: dict[str, Any] = {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": grantor,
            "subject_token_type": TOKEN_TYPE_JWT,
            "agent": agent,
            "grant": grant or [],
            "label": label or [],
        }
        for k, v in (("ttl", ttl), ("objective", objective), ("task", task)):
            if v is not None:
                form[k] = v
        doc = client.request("POST", "/v1/token", form=form)
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    if out_file:
        write_private(out_file, doc["token"] + "\n")
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    err.print(f"delegated [bold green]{doc['spiffe_id']}[/] until {_when(doc['expires_at'])}")
    err.print(f"  token id {doc['token_id']}, grants: {', '.join(doc['grants']) or '(none)'}")
    if out_file:
        err.print(f"  token written to {out_file}")
    else:
        print(doc["token"])


@app.command()
def whoami(
    token: Annotated[str | None, typer.Option("--token", help="Token file (- for stdin).")] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Show an identity and its whole delegation chain (the logged-in user's by default)."""
    client = _client(data_dir)
    try:
        tok = read_token_file(token) if token else client.user_token()
        doc = client.request("GET", "/v1/whoami", token=tok)
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        _print_identity(doc)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (spiffe://TD/user/NAME).")],
    grant: Annotated[
        list[str] | None, typer.Option("--grant", help="KIND:PATTERN, repeatable.")
    ] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Add a user (admin only). Their credential goes to DATA_DIR/credentials/NAME (0600);
    act as them with TETHER_USER=NAME."""
    client = _client(data_dir)
    try:
        doc = client.request(
            "POST",
            "/v1/users",
            token=client.user_token(),
            json_body={"name": name, "grants": grant or []},
        )
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    path = client.data_dir.credentials / name
    write_private(path, doc["credential"] + "\n", overwrite=False)
    err.print(f"added [bold green]{doc['spiffe_id']}[/]; credential written to {path}")


@identities_app.command("ls")
def identities_ls(
    kind: Annotated[str | None, typer.Option(help="user, agent, beam or service")] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List identities: users and every agent a token was ever delegated to."""
    client = _client(data_dir)
    try:
        doc = client.request(
            "GET",
            "/v1/identities",
            token=client.user_token(),
            params={"kind": kind} if kind else None,
        )
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    t = Table("spiffe id", "kind", "first delegated by", "since")
    for r in doc["identities"]:
        t.add_row(r["spiffe_id"], r["kind"], r["created_by"] or "-", _when(r["created_ms"] / 1000))
    out.print(t)


@app.command()
def revoke(
    token_id: Annotated[
        str | None,
        typer.Option("--token-id", help="Revoke this token (and all delegated from it)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Revoke the token in this file (and all delegated from it)."),
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option("--agent", help="Revoke every token of this agent (name or SPIFFE ID)."),
    ] = None,
    subtree: Annotated[
        str | None,
        typer.Option("--subtree", help="Revoke everything delegated by this identity (SPIFFE ID)."),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke by token id, by agent, or a whole delegation subtree. Takes effect at once."""
    from tether.identity.jws import decode_unverified

    chosen = [x for x in (token_id, token, agent, subtree) if x]
    if len(chosen) != 1:
        err.print("[bold red]error:[/] give exactly one of --token-id, --token, --agent, --subtree")
        raise typer.Exit(2)
    client = _client(data_dir)
    try:
        if token:
            _, payload = decode_unverified(read_token_file(token))
            kind, value = "token", str(payload.get("jti", ""))
        elif token_id:
            kind, value = "token", token_id
        elif agent:
            kind = "agent"
            value = (
                agent
                if agent.startswith("spiffe://")
                else (f"spiffe://{client.data_dir.load_config().trust_domain}/agent/{agent}")
            )
        else:
            kind, value = "subtree", str(subtree)
        doc = client.request(
            "POST",
            "/v1/revoke",
            token=client.user_token(),
            json_body={"kind": kind, "value": value, "reason": reason},
        )
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    out.print(
        f"revoked {doc['kind']} [bold]{doc['value']}[/] (effective {_when(doc['at_ms'] / 1000)})"
    )


@app.command()
def bundle(data_dir: DataDirOpt = None) -> None:
    """Print the SPIFFE trust bundle (JWKS) that verifies Tether SVIDs."""
    client = _client(data_dir)
    try:
        print(json.dumps(client.request("GET", "/v1/bundle"), indent=2))
    except TetherError as e:
        fail(e)
    finally:
        client.close()


@svid_app.command("x509")
def svid_x509(
    token: Annotated[
        str | None, typer.Option("--token", help="Token file of the identity (default: you).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for svid.pem, svid.key, bundle.pem.")
    ] = Path("."),
    data_dir: DataDirOpt = None,
) -> None:
    """Get an X.509-SVID: the key is made here and never leaves this machine."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    client = _client(data_dir)
    try:
        tok = read_token_file(token) if token else client.user_token()
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
        doc = client.request(
            "POST",
            "/v1/svid/x509",
            token=tok,
            json_body={"csr": csr.public_bytes(serialization.Encoding.PEM).decode()},
        )
    except TetherError as e:
        fail(e)
    finally:
        client.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(out_dir / "svid.key", pem)
    (out_dir / "svid.pem").write_text(doc["chain_pem"])
    out.print(
        f"X.509-SVID for [bold]{doc['spiffe_id']}[/] until {_when(doc['expires_at'])} in {out_dir}"
    )


def main() -> None:
    try:
        app()
    except TetherError as e:  # the one place the CLI turns errors into text
        err.print(f"[bold red]error:[/] {e.diagnostics()}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
