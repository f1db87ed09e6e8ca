"""``tether audit``: read, search, prove and verify the audit log straight from the data dir.

Every command opens ``<data dir>/audit.db`` read-only, so forensics works with the server down
(or running: SQLite WAL lets a reader see a consistent snapshot while the server writes). The
checkpoint verifier key comes from ``<data dir>/keys/audit-note.vkey``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.audit.log import AuditLog
from tether.audit.merkle import leaf_hash, verify_inclusion
from tether.audit.note import NoteVerifier, verify_checkpoint
from tether.config import DataDir, parse_duration, resolve_data_dir
from tether.errors import BadRequest, ConfigError, TetherError, VerificationFailed

__all__ = ["app"]

app = typer.Typer(
    help="Inspect and verify the tamper-evident audit log (works with the server down).",
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")]
VKEY_FILE = "audit-note.vkey"
BODY_PREVIEW = 240
_DECISION_STYLE = {"allow": "green", "deny": "bold red", "escalate": "yellow", "error": "red"}


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The one place CLI commands turn a TetherError into a message and exit status 1."""
    try:
        yield
    except TetherError as e:
        err.print(f"[bold red]error:[/] {escape(e.diagnostics())}")
        raise typer.Exit(1) from None


def _open(data_dir: Path | None) -> AuditLog:
    dd = DataDir(resolve_data_dir(data_dir))
    config = dd.load_config()
    vkey_path = dd.keys / VKEY_FILE
    verifier = NoteVerifier.from_vkey(vkey_path.read_text()) if vkey_path.is_file() else None
    return AuditLog.open_readonly(dd.audit_db_path, verifier, config.audit_origin)


def _when(ms: Any) -> str:
    if not isinstance(ms, int):
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _parse_time(text: str | None) -> int | None:
    """``2026-01-02T03:04:05Z``, a date, epoch milliseconds, or a duration ago (``15m``)."""
    if text is None:
        return None
    s = text.strip()
    if re.fullmatch(r"\d{12,}", s):
        return int(s)
    try:
        return int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        pass
    try:
        return int((time.time() - parse_duration(s)) * 1000)
    except ConfigError as e:
        raise BadRequest(
            f"not a time: {text!r}", hint="use ISO 8601, epoch ms, or a duration ago like 15m"
        ) from e


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_data(entry: dict[str, Any], limit: int = 100) -> str:
    data = entry.get("data") or {}
    return _short(" ".join(f"{k}={_short(v, 40)}" for k, v in data.items()), limit)


def _print_json(entries: list[dict[str, Any]]) -> None:
    for e in entries:
        sys.stdout.write(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _table(entries: list[dict[str, Any]], title: str | None = None) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("#", "time", "type", "actor -> subject", "decision", "session", "data"):
        t.add_column(col, overflow="fold")
    for e in entries:
        who = e.get("actor") or ""
        if e.get("subject"):
            who = f"{who} -> {e['subject']}" if who else f"-> {e['subject']}"
        decision = e.get("decision") or ""
        style = _DECISION_STYLE.get(decision, "")
        t.add_row(
            str(e.get("index")),
            _when(e.get("time_ms")),
            escape(str(e.get("type"))),
            escape(who),
            f"[{style}]{escape(decision)}[/]" if style else escape(decision),
            escape(e.get("session") or ""),
            escape(_key_data(e, 60)),
        )
    return t


@app.command()
def verify(
    data_dir: DataDirOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A checkpoint saved earlier: prove the log is a consistent extension."),
    ] = None,
) -> None:
    """Recompute the whole tree, check every entry, body and signed checkpoint. Exit 1 naming
    the first bad entry."""
    with _errors():
        audit = _open(data_dir)
        saved = checkpoint.read_text() if checkpoint is not None else None
        try:
            report = audit.verify(saved)
        except VerificationFailed as e:
            err.print(f"[bold red]FAILED:[/] {escape(e.message)}")
            if e.index is not None:
                err.print(f"first bad entry: [bold]{e.index}[/]")
            if e.hint:
                err.print(f"  hint: {escape(e.hint)}")
            raise typer.Exit(1) from None
        out.print("[bold green]OK[/]")
        out.print(f"  entries      {report.size}")
        out.print(f"  root         {report.root.hex()}")
        out.print(
            f"  checkpoints  {report.checkpoints} signed, largest covers {report.signed_size}"
        )
        out.print(f"  bodies       {report.bodies}")
        if report.extends is not None:
            out.print(f"  extends      the given checkpoint at size {report.extends}")
        out.print(f"  took         {report.seconds:.2f} s")
        for w in report.warnings:
            out.print(f"[yellow]warning:[/] {escape(w)}")


@app.command()
def tail(
    data_dir: DataDirOpt = None,
    n: Annotated[int, typer.Option("-n", help="How many entries.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The newest entries."""
    with _errors():
        audit = _open(data_dir)
        entries = audit.tail(n)
        if as_json:
            _print_json(entries)
        else:
            out.print(_table(entries))
        last = entries[-1]["index"] if entries else -1
        while follow:
            try:
                time.sleep(0.5)
            except KeyboardInterrupt:
                return
            fresh = audit.search(after=last, limit=1000)
            if fresh:
                last = fresh[-1]["index"]
                if as_json:
                    _print_json(fresh)
                else:
                    out.print(_table(fresh))


@app.command()
def search(
    data_dir: DataDirOpt = None,
    identity: Annotated[str | None, typer.Option(help="SPIFFE ID as actor or subject.")] = None,
    session: Annotated[str | None, typer.Option(help="Session / task id.")] = None,
    type_: Annotated[
        str | None, typer.Option("--type", help="Event type; 'llm.*' matches a prefix.")
    ] = None,
    decision: Annotated[str | None, typer.Option(help="allow / deny / escalate / error")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, epoch ms or '15m' ago.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time, epoch ms or '15m' ago.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Entries matching every filter, oldest first."""
    with _errors():
        entries = _open(data_dir).search(
            identity=identity,
            session=session,
            type=type_,
            decision=decision,
            since_ms=_parse_time(since),
            until_ms=_parse_time(until),
            limit=limit,
        )
        if as_json:
            _print_json(entries)
        else:
            out.print(_table(entries, f"{len(entries)} entries"))


@app.command()
def show(
    index: Annotated[int, typer.Argument(help="Entry index.")],
    data_dir: DataDirOpt = None,
) -> None:
    """One entry: its canonical JSON, leaf hash and bodies."""
    with _errors():
        audit = _open(data_dir)
        data = audit.entry_data(index)
        entry = audit.entry(index)
        out.print(f"[bold]entry {index}[/]  {_when(entry.get('time_ms'))}")
        out.print(f"leaf hash  {leaf_hash(data).hex()}")
        out.print_json(data.decode())
        for name, digest in (entry.get("bodies") or {}).items():
            body = audit.body(digest)
            out.print(f"[bold]body {escape(name)}[/] sha256:{digest} ({len(body)} bytes)")
            out.print(escape(_preview(body, 2000)))


def _preview(body: bytes, limit: int = BODY_PREVIEW) -> str:
    text = body.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more]"


@app.command()
def proof(
    index: Annotated[int, typer.Argument(help="Entry index.")],
    data_dir: DataDirOpt = None,
    size: Annotated[
        int | None, typer.Option(help="Tree size (default: the latest signed checkpoint).")
    ] = None,
) -> None:
    """Inclusion proof of an entry, checked against the signed checkpoint when it covers it."""
    with _errors():
        audit = _open(data_dir)
        note = audit.latest_checkpoint()
        signed = None
        if audit.verifier is not None:
            signed = verify_checkpoint(note, audit.verifier, audit.origin)
        if size is None:
            size = signed.size if signed is not None and index < signed.size else audit.size()
        hashes = audit.inclusion_proof(index, size)
        leaf = leaf_hash(audit.entry_data(index))
        root = signed.root_hash if signed is not None and signed.size == size else audit.root(size)
        verify_inclusion(leaf, index, size, hashes, root)
        out.print(f"entry {index} in tree of size {size}")
        out.print(f"leaf hash  {leaf.hex()}")
        for i, h in enumerate(hashes):
            out.print(f"  {i:2d}  {h.hex()}")
        out.print(f"root       {root.hex()} ({base64.b64encode(root).decode()})")
        how = "the signed checkpoint" if signed is not None and signed.size == size else "the log"
        out.print(f"[green]verified[/] against {how}")


@app.command("session")
def session_(
    session_id: Annotated[str, typer.Argument(help="Session / task id.")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One session as a timeline: who did what, every decision and its reasons, prompts and
    responses (bodies shown truncated)."""
    with _errors():
        audit = _open(data_dir)
        entries = audit.session(session_id)
        if as_json:
            _print_json(entries)
            return
        if not entries:
            err.print(f"no entries for session {escape(session_id)!r}")
            raise typer.Exit(1)
        first, last = entries[0].get("time_ms"), entries[-1].get("time_ms")
        out.print(
            f"[bold]session {escape(session_id)}[/]: {len(entries)} entries, "
            f"{_when(first)} .. {_when(last)}"
        )
        for e in entries:
            _print_timeline_entry(audit, e)


def _print_timeline_entry(audit: AuditLog, e: dict[str, Any]) -> None:
    decision = e.get("decision")
    style = _DECISION_STYLE.get(decision or "", "")
    verdict = f"  [{style}]{escape(decision)}[/]" if decision else ""
    who = escape(e.get("actor") or "")
    if e.get("subject"):
        who += f" -> {escape(e['subject'])}"
    out.print(
        f"[dim]{_when(e.get('time_ms'))}[/] [dim]#{e.get('index')}[/] "
        f"[bold]{escape(str(e.get('type')))}[/]{verdict}  {who}"
    )
    data = e.get("data") or {}
    for key in ("chain", "grants", "reason", "reasons", "policy", "tool", "model", "objective"):
        if key in data:
            out.print(f"    {key}: {escape(_short(data[key], 160))}")
    rest = {k: v for k, v in data.items() if k not in _TIMELINE_KEYS}
    if rest:
        out.print(f"    {escape(_key_data({'data': rest}, 160))}")
    for name, digest in (e.get("bodies") or {}).items():
        try:
            text = _preview(audit.body(digest))
        except TetherError as exc:
            text = f"<{exc.message}>"
        out.print(f"    [cyan]{escape(name)}[/]: {escape(text)}")


_TIMELINE_KEYS = {"chain", "grants", "reason", "reasons", "policy", "tool", "model", "objective"}


@app.command()
def export(
    data_dir: DataDirOpt = None,
    format_: Annotated[
        str, typer.Option("--format", help="jsonl (leaf data, verifiable) or ocsf.")
    ] = "jsonl",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here (default stdout).")
    ] = None,
    bodies: Annotated[
        Path | None, typer.Option("--bodies", help="Also write each body here, named by hash.")
    ] = None,
    checkpoint_out: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-out", help="Also save the signed checkpoint the export matches."
        ),
    ] = None,
) -> None:
    """Export the entries covered by the latest signed checkpoint."""
    with _errors():
        if format_ not in ("jsonl", "ocsf"):
            raise BadRequest(f"unknown format {format_!r}", hint="use --format jsonl or ocsf")
        fmt: Literal["jsonl", "ocsf"] = "jsonl" if format_ == "jsonl" else "ocsf"
        audit = _open(data_dir)
        note = audit.latest_checkpoint()
        size = int(note.split("\n", 2)[1])
        if out_file is None:
            n = audit.export(sys.stdout.buffer, fmt, bodies, size=size)
            sys.stdout.buffer.flush()
        else:
            with out_file.open("wb") as fp:
                n = audit.export(fp, fmt, bodies, size=size)
        if checkpoint_out is not None:
            checkpoint_out.write_text(note)
        err.print(f"exported {n} entries ({fmt}), the size of the latest signed checkpoint")


@app.command()
def checkpoint(
    data_dir: DataDirOpt = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Save it to this file.")] = None,
) -> None:
    """The latest signed checkpoint (keep one: 'verify --checkpoint' proves no rollback)."""
    with _errors():
        note = _open(data_dir).latest_checkpoint()
        if out_file is None:
            sys.stdout.write(note)
        else:
            out_file.write_text(note)
            err.print(f"saved checkpoint of size {note.split(chr(10), 2)[1]} to {out_file}")


@app.command()
def vkey(data_dir: DataDirOpt = None) -> None:
    """The note verifier key that signs the checkpoints."""
    with _errors():
        dd = DataDir(resolve_data_dir(data_dir))
        path = dd.keys / VKEY_FILE
        if not path.is_file():
            raise ConfigError(f"no verifier key at {path}", hint="run 'tether init'")
        sys.stdout.write(NoteVerifier.from_vkey(path.read_text()).verifier_key + "\n")
