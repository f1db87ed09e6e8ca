"""``tether run`` and ``tether beam ls | show | logs | exec | kill | rm``, through the API.

``tether run`` creates a beam, streams its output (the command's stdout to stdout, its stderr
to stderr, as produced) and exits with its exit code; Ctrl-C kills the beam. Status lines go
to stderr, so ``tether run -- cmd | jq`` sees only the command's output. Every command acts as
the local user, or with ``--token FILE`` as the identity whose token is in FILE.

``tether beam show`` proves the beam's objective attestation against the audit log: the
``beam.attest`` entry re-hashes to the digest in the beam's token, and it is included (RFC
9162 inclusion proof) in a checkpoint signed with the log's key (the data dir's
``keys/audit-note.vkey`` when this machine has it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.audit.canonical import canonical_json
from tether.audit.merkle import leaf_hash, verify_inclusion
from tether.audit.note import NoteVerifier, verify_checkpoint
from tether.cli.client import ApiClient, ApiError, read_token_file
from tether.config import DataDir, resolve_data_dir
from tether.errors import TetherError, VerificationFailed

__all__ = ["beam_app", "run_cmd"]

beam_app = typer.Typer(
    help="Beams: sandboxes with a delegated identity, a TTL and an attested objective.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

CREATE_TIMEOUT = httpx.Timeout(120.0, connect=3.0)  # the first beam of a boot hashes /usr
STREAM_TIMEOUT = httpx.Timeout(None, connect=3.0)
CHECKPOINT_WAIT = 10.0  # checkpoints are signed every 250 ms; this is a failure backstop
DEFAULT_GRANTS = ["model:*"]

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="TETHER_HOME", help="Data directory (default ~/.tether)."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Act with the token in this file ('-': stdin), not as the user."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_STATE_STYLE = {"running": "green", "starting": "yellow", "ended": "dim"}


def _fail(e: TetherError) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(e.diagnostics())}")
    raise typer.Exit(1)


class _Session:
    """One API client and the token it acts with."""

    def __init__(self, data_dir: Path | None, token_file: str | None) -> None:
        self.data_dir = DataDir(resolve_data_dir(data_dir))
        self.client = ApiClient(self.data_dir)
        try:
            self.token = read_token_file(token_file) if token_file else self.client.user_token()
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def _http(self) -> httpx.Client:
        return self.client._http  # the same transport (unix socket or TCP) as every command

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Any:
        if timeout is None:
            return self.client.request(
                method, path, token=self.token, json_body=json_body, params=params
            )
        try:
            resp = self._http().request(
                method,
                path,
                headers=self._headers(),
                json=json_body,
                params=params,
                timeout=timeout,
            )
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return _decode(resp)

    def _unreachable(self, e: Exception) -> TetherError:
        return TetherError(
            f"cannot reach the Tether server at {self.client.target} ({type(e).__name__})",
            hint="start it with 'tether serve', or set TETHER_ADDR",
        )

    @contextlib.contextmanager
    def stream(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Iterator[Iterator[dict[str, Any]]]:
        """NDJSON frames as the server sends them."""
        try:
            with self._http().stream(
                method,
                path,
                headers=self._headers(),
                json=json_body,
                params=params,
                timeout=STREAM_TIMEOUT,
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _decode(resp)
                yield (json.loads(line) for line in resp.iter_lines() if line.strip())
        except httpx.TransportError as e:
            raise self._unreachable(e) from e


def _decode(resp: httpx.Response) -> Any:
    try:
        doc = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if resp.status_code >= 400:
        if isinstance(doc, dict) and "error" in doc:
            raise ApiError(resp.status_code, str(doc["error"]), str(doc.get("error_description")))
        raise ApiError(resp.status_code, "http_error", resp.text[:200])
    return doc


def _write_frames(frames: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """Copy output frames to stdout/stderr as they come; return the end frame."""
    for frame in frames:
        if "end" in frame:
            return dict(frame["end"])
        stream = frame.get("s")
        if stream in ("out", "err"):
            sink = sys.stdout.buffer if stream == "out" else sys.stderr.buffer
            sink.write(base64.b64decode(frame["b64"]))
            sink.flush()
        elif stream == "meta":
            err.print(f"[yellow]{escape(str(frame.get('text')))}[/]")
    return None


def _when(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


def _exit_code(end: dict[str, Any] | None) -> int:
    if end is None:
        return 1
    code = end.get("exit_code")
    return code if isinstance(code, int) and 0 <= code <= 255 else 1


def _say_end(beam_id: str, end: dict[str, Any] | None) -> None:
    if end is None:
        err.print(f"[red]beam {beam_id}: the output stream ended early[/]")
        return
    reason = end.get("reason")
    code = end.get("exit_code")
    what = {
        "exit": f"exited with {code}",
        "ttl": f"killed: its TTL ran out (exit {code})",
        "killed": f"killed by {end.get('by', '?')} (exit {code})",
        "reaped": "reaped after a server restart",
        "revoked": f"killed: its identity was revoked ({end.get('by', '?')})",
        "failed": f"failed to start: {end.get('error', '?')}",
    }.get(str(reason), f"ended: {reason}")
    style = "dim" if reason == "exit" and code == 0 else "yellow"
    err.print(f"[{style}]beam {beam_id} {escape(what)}[/]")


def run_cmd(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    objective: Annotated[
        str | None,
        typer.Option(help="What the beam is for (attested). Default: the command line."),
    ] = None,
    grant: Annotated[
        list[str] | None,
        typer.Option("--grant", help="KIND:PATTERN, repeatable, within yours (default model:*)."),
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime; the beam is killed at expiry.")] = "15m",
    backend: Annotated[str | None, typer.Option(help="bwrap (default) or runsc.")] = None,
    workspace: Annotated[
        Path | None, typer.Option(help="Bind this directory as /workspace (default: a fresh one).")
    ] = None,
    keep_workspace: Annotated[
        bool, typer.Option("--keep-workspace", help="Keep the fresh workspace after the end.")
    ] = False,
    memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 2G.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU limit, e.g. 1 or 0.5.")] = None,
    pids: Annotated[int | None, typer.Option(help="Process limit, e.g. 256.")] = None,
    allow_domain: Annotated[
        list[str] | None,
        typer.Option("--allow-domain", help="Let the beam reach this domain (egress), repeatable."),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Print the beam id and return at once.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No status lines.")] = False,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run a command in a new beam, stream its output, exit with its exit code."""
    if not command:
        _fail(TetherError("no command given", hint="tether run [OPTIONS] -- CMD [ARGS...]"))
    grants = list(grant) if grant else list(DEFAULT_GRANTS)
    body: dict[str, Any] = {
        "objective": objective or shlex.join(command),
        "argv": command,
        "grants": grants,
        "ttl": ttl,
        "keep_workspace": keep_workspace,
        "allow_domains": list(allow_domain or []),
    }
    for key, value in (("backend", backend), ("memory", memory), ("cpus", cpus), ("pids", pids)):
        if value is not None:
            body[key] = value
    if workspace is not None:
        body["workspace"] = str(workspace.expanduser().resolve())
    try:
        session = _Session(data_dir, token)
    except TetherError as e:
        _fail(e)
    try:
        rec = session.call("POST", "/v1/beams", json_body=body, timeout=CREATE_TIMEOUT)
        beam_id = str(rec["id"])
        if detach:
            print(beam_id)
            return
        if not quiet:
            if not grant:
                err.print("[dim]no --grant: the beam may call any model you may (model:*)[/]")
            err.print(
                f"[dim]beam {beam_id} ({rec['backend']}) running, ttl {_duration(rec['ttl_s'])},"
                f" attestation sha256:{rec['attestation']['sha256'][:16]}...[/]"
            )
        end = _follow(session, beam_id)
    except TetherError as e:
        session.close()
        _fail(e)
    session.close()
    if not quiet or end is None or end.get("reason") != "exit":
        _say_end(beam_id, end)
    raise typer.Exit(_exit_code(end))


def _follow(session: _Session, beam_id: str) -> dict[str, Any] | None:
    path = f"/v1/beams/{beam_id}/logs"
    try:
        with session.stream("GET", path, params={"follow": "true"}) as frames:
            return _write_frames(frames)
    except KeyboardInterrupt:
        err.print(f"\n[yellow]interrupted: killing beam {beam_id}[/]")
        try:
            session.call("POST", f"/v1/beams/{beam_id}/kill", timeout=CREATE_TIMEOUT)
        except TetherError as e:
            err.print(f"[red]could not kill beam {beam_id}: {escape(e.diagnostics())}[/]")
        raise typer.Exit(130) from None


def _with_session(data_dir: Path | None, token: str | None) -> _Session:
    try:
        return _Session(data_dir, token)
    except TetherError as e:
        _fail(e)


@beam_app.command("ls")
def ls(
    running: Annotated[bool, typer.Option("--running", help="Only live beams.")] = False,
    as_json: JsonOpt = False,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Beams you may see (yours and those of agents you delegated), newest first."""
    session = _with_session(data_dir, token)
    try:
        doc = session.call("GET", "/v1/beams", params={"all": str(not running).lower()})
    except TetherError as e:
        _fail(e)
    finally:
        session.close()
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    t = Table(header_style="bold")
    for col in ("id", "state", "backend", "created", "ends", "exit", "creator", "objective"):
        t.add_column(col, overflow="fold", no_wrap=col == "id")
    for b in doc["beams"]:
        state = str(b["state"])
        style = _STATE_STYLE.get(state, "")
        if state == "ended":
            ends = f"{b.get('end_reason')} {_when(b.get('ended_ms'))}"
        else:
            ends = f"in {_duration(max(0, b['expires_ms'] / 1000 - time.time()))}"
        t.add_row(
            b["id"],
            f"[{style}]{state}[/]" if style else state,
            b["backend"],
            _when(b["created_ms"]),
            escape(ends),
            "-" if b.get("exit_code") is None else str(b["exit_code"]),
            escape(str(b["creator"]).split("/", 3)[-1]),
            escape(_short(str(b["objective"]), 48)),
        )
    out.print(t)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@beam_app.command("show")
def show(
    beam_id: Annotated[str, typer.Argument(help="Beam id (b-...).")],
    as_json: JsonOpt = False,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """One beam: its identity, limits, state, and its attestation proven against the log."""
    session = _with_session(data_dir, token)
    try:
        rec = session.call("GET", f"/v1/beams/{beam_id}")
        proof = prove_attestation(session, rec)
    except VerificationFailed as e:
        session.close()
        err.print(f"[bold red]attestation NOT proven:[/] {escape(e.message)}")
        raise typer.Exit(1) from None
    except TetherError as e:
        session.close()
        _fail(e)
    session.close()
    if as_json:
        print(json.dumps({"beam": rec, "proof": proof}, indent=2))
        return
    _print_beam(rec, proof)


def _print_beam(rec: dict[str, Any], proof: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None)
    t.add_row("beam", f"[bold]{rec['id']}[/]  {rec['spiffe_id']}")
    state = rec["state"]
    if state == "ended":
        state += f" ({rec.get('end_reason')}, exit {rec.get('exit_code')})"
    t.add_row("state", escape(state))
    t.add_row("backend", f"{rec['backend']}  pid {rec.get('pid') or '-'}")
    t.add_row("chain", escape(" -> ".join(rec["chain"])))
    t.add_row("objective", escape(rec["objective"]))
    t.add_row("command", escape(shlex.join(rec["argv"])))
    t.add_row("grants", escape(", ".join(rec["grants"]) or "(none)"))
    if rec.get("allow_domains"):
        t.add_row("egress", escape(", ".join(rec["allow_domains"])))
    limits = {k: v for k, v in (rec.get("limits") or {}).items() if v is not None}
    t.add_row("limits", escape(", ".join(f"{k}={v}" for k, v in limits.items()) or "(none)"))
    t.add_row("created", _when(rec["created_ms"]))
    t.add_row("expires", _when(rec["expires_ms"]))
    if rec.get("ended_ms"):
        t.add_row(
            "ended",
            _when(rec["ended_ms"]) + (f" by {rec['ended_by']}" if rec.get("ended_by") else ""),
        )
    ws = rec["workspace"] + (
        "" if rec["workspace_owned"] and not rec["keep_workspace"] else " (kept)"
    )
    t.add_row("workspace", escape(ws))
    t.add_row("token", f"{rec['token']['token_id']} (revoked when the beam ends)")
    for w in (rec.get("info") or {}).get("warnings", []):
        t.add_row("[yellow]warning[/]", escape(str(w)))
    out.print(t)
    att = rec["attestation"]
    doc = att["document"]
    out.print("\n[bold]objective attestation[/]")
    a = Table(show_header=False, box=None)
    a.add_row("sha256", att["sha256"])
    a.add_row("base fs", str(doc.get("base_fs")))
    a.add_row("tools", str(len(doc.get("tools", []))) + " definition digest(s)")
    a.add_row("entry", f"#{att['index']}, the first of session {rec['id']}")
    a.add_row("token", "objective_sha256 = this digest")
    a.add_row(
        "[green]proven[/]",
        f"inclusion in the checkpoint of size {proof['checkpoint_size']} "
        f"(root {proof['root'][:16]}...), signature by {escape(proof['signed_by'])}",
    )
    out.print(a)


def prove_attestation(session: _Session, rec: dict[str, Any]) -> dict[str, Any]:
    """Check the attestation end to end; raise VerificationFailed naming what does not hold."""
    att = rec["attestation"]
    index = int(att["index"])
    entry_text = str(att.get("entry", ""))
    try:
        entry = json.loads(entry_text)
    except ValueError as e:
        raise VerificationFailed("the attestation entry is not JSON") from e
    if entry.get("type") != "beam.attest" or entry.get("session") != rec["id"]:
        raise VerificationFailed(f"entry #{index} is not this beam's attestation")
    if entry.get("index") != index:
        raise VerificationFailed(f"entry says index {entry.get('index')}, expected {index}")
    doc = entry.get("data", {}).get("attestation")
    digest = hashlib.sha256(canonical_json(doc)).hexdigest()
    for what, value in (
        ("the entry's digest", entry["data"].get("sha256")),
        ("the beam record's digest", att["sha256"]),
        ("the token's objective_sha256", rec["token"]["objective_sha256"]),
    ):
        if value != digest:
            raise VerificationFailed(f"the attestation hashes to {digest[:16]}..., {what} differs")
    verifier, signed_by = _verifier(session)
    deadline = time.monotonic() + CHECKPOINT_WAIT
    while True:
        cp = verify_checkpoint(_text(session, "/v1/audit/checkpoint"), verifier)
        if cp.size > index:
            break
        if time.monotonic() > deadline:
            raise VerificationFailed(f"no signed checkpoint covers entry #{index} yet")
        time.sleep(0.1)
    proof = session.call(
        "GET", "/v1/audit/proof/inclusion", params={"index": index, "size": cp.size}
    )
    hashes = [bytes.fromhex(h) for h in proof["hashes"]]
    verify_inclusion(leaf_hash(entry_text.encode()), index, cp.size, hashes, cp.root_hash)
    return {
        "entry_index": index,
        "checkpoint_size": cp.size,
        "root": cp.root_hash.hex(),
        "signed_by": signed_by,
        "digest": digest,
    }


def _text(session: _Session, path: str) -> str:
    try:
        resp = session._http().get(path, headers=session._headers())
    except httpx.TransportError as e:
        raise session._unreachable(e) from e
    if resp.status_code >= 400:
        _decode(resp)
    return resp.text


def _verifier(session: _Session) -> tuple[NoteVerifier, str]:
    """The log's key from this machine's data dir when it has one (a key fetched from the
    server being checked proves less, and says so)."""
    local = session.data_dir.keys / "audit-note.vkey"
    if local.is_file():
        v = NoteVerifier.from_vkey(local.read_text())
        return v, f"{v.name} (key from {local})"
    v = NoteVerifier.from_vkey(_text(session, "/v1/audit/vkey"))
    return v, f"{v.name} (key fetched from the server)"


@beam_app.command("logs")
def logs(
    beam_id: Annotated[str, typer.Argument(help="Beam id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until it ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the NDJSON frames.")] = False,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The beam's output (stdout to stdout, stderr to stderr)."""
    session = _with_session(data_dir, token)
    try:
        params = {"follow": str(follow).lower()}
        with session.stream("GET", f"/v1/beams/{beam_id}/logs", params=params) as frames:
            if as_json:
                for frame in frames:
                    print(json.dumps(frame), flush=True)
                return
            end = _write_frames(frames)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except TetherError as e:
        _fail(e)
    finally:
        session.close()
    if end is not None:
        _say_end(beam_id, end)


@beam_app.command("exec")
def exec_(
    beam_id: Annotated[str, typer.Argument(help="Beam id.")],
    command: Annotated[list[str], typer.Argument(help="The command, after --.")],
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run a command inside a running beam; exit with its exit code."""
    session = _with_session(data_dir, token)
    try:
        with session.stream(
            "POST", f"/v1/beams/{beam_id}/exec", json_body={"argv": command}
        ) as frames:
            end = _write_frames(frames)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except TetherError as e:
        _fail(e)
    finally:
        session.close()
    raise typer.Exit(_exit_code(end))


@beam_app.command("kill")
def kill(
    beam_id: Annotated[str, typer.Argument(help="Beam id.")],
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Kill a beam's whole process tree now; its identity is revoked."""
    session = _with_session(data_dir, token)
    try:
        rec = session.call("POST", f"/v1/beams/{beam_id}/kill", timeout=CREATE_TIMEOUT)
    except TetherError as e:
        _fail(e)
    finally:
        session.close()
    out.print(f"killed beam [bold]{rec['id']}[/] (exit {rec.get('exit_code')}); token revoked")


@beam_app.command("rm")
def rm(
    beam_id: Annotated[str, typer.Argument(help="Beam id.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Kill it first if running.")] = False,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove an ended beam's record and output (its audit session stays, forever)."""
    session = _with_session(data_dir, token)
    try:
        session.call(
            "DELETE",
            f"/v1/beams/{beam_id}",
            params={"force": str(force).lower()},
            timeout=CREATE_TIMEOUT,
        )
    except TetherError as e:
        _fail(e)
    finally:
        session.close()
    out.print(f"removed beam [bold]{beam_id}[/]")
