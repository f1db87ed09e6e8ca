"""`make demo`: Tether's main job end to end on the embedded defaults.

Starts a real server on a fresh data directory (.demo/), then, with the real `tether` command
and the unmodified OpenAI SDK: a human identity, a two-hop delegated agent token and its chain,
a refused widening with the reason, model calls through the LLM gateway (the bundled scripted
model, since no upstream is configured) with a proposed tool call denied before the agent sees
it, a model outside the grants refused, a swarm of agents held to a group limit with an
approval quorum, a real OpenAI-SDK agent in a beam (bubblewrap sandbox, no network, its own
delegated token) with its attested objective proved against the log, an MCP agent in a beam
reading customer rows through the tool gateway (a write tool refused, a schema change held for
a human's approval), a revocation that bites, the session timeline and a verification of the
log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import httpx2
import openai

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
HOME = DEMO / "home"
TETHER = [sys.executable, "-m", "tether.cli.main"]
ENV = {**os.environ, "TETHER_HOME": str(HOME)}
ENV.pop("TETHER_ADDR", None)
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def tether(*args: str, expect_fail: bool = False) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in args).replace(str(DEMO) + "/", "")
    print(f"{DIM}$ tether {shown}{RESET}", flush=True)
    proc = subprocess.run([*TETHER, *args], env=ENV, cwd=DEMO)
    if (proc.returncode != 0) != expect_fail:
        raise SystemExit(f"demo step failed unexpectedly: tether {shown}")


def wait_ready(server: subprocess.Popen[bytes]) -> None:
    sock = HOME / "tether.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited; see .demo/server.log")
        if sock.exists():
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
                    if c.get("http://tether/readyz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise SystemExit("the server did not become ready in 30 s; see .demo/server.log")


# The CRM behind the tool gateway: the bundled SQL MCP server, launched over stdio by the
# gateway; a call held for approval waits up to two minutes.
CRM_CONFIG = """
[mcp.servers.crm]
command = ["{python}", "-m", "tether.toolbox.sql", "--db", "{db}"]
escalation_hold = "120s"

[mcp.servers.crm.effects]
create_index = "db.schema_change"
"""

CRM_POLICY = """\
@id("crm-schema-changes-need-a-human")
@escalate("1 of human")
@reason("schema changes on the CRM need a human's approval")
permit (
  principal,
  action == Tether::Action::"tool.call",
  resource == Tether::Tool::"crm.create_index"
) when { context.granted };
"""

BOUNDARIES = """\
[groups.swarm]
labels = ["swarm"]

[groups.sre]
members = ["spiffe://demo.tether.local/user/bob"]
delegated = false

[effects]
"db.schema_change" = ["tool.call:db.add_index"]

[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 2
window = "1h"
on_exceed = "escalate"
quorum = "1 of group:sre"
"""


def agent_sdk(token_file: Path) -> openai.OpenAI:
    """An unmodified OpenAI client: its API key is the agent's delegated token, its base URL
    the gateway (here over the data dir's unix socket)."""
    transport = httpx2.HTTPTransport(uds=str(HOME / "tether.sock"))
    return openai.OpenAI(
        base_url="http://tether/v1",
        api_key=token_file.read_text().strip(),
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    print(f"{DIM}agent> {model}: {prompt!r}{RESET}", flush=True)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        tools=[
            {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in ("search.web", "db.drop_table", "db.add_index")
        ],
        max_tokens=64,
    )
    msg = reply.choices[0].message
    calls = [f"{c.function.name}({c.function.arguments})" for c in msg.tool_calls or []]
    text = (msg.content or "").strip()
    print(f"model> {text}" + (f"  tool calls: {', '.join(calls)}" if calls else ""), flush=True)
    return text


def capture(*args: str) -> str:
    return subprocess.run(
        [*TETHER, *args], env=ENV, cwd=DEMO, capture_output=True, text=True, check=True
    ).stdout


def wait_for_approval(resource: str, proc: subprocess.Popen[bytes]) -> str:
    """The id of the pending approval for ``resource``, once the held call has asked."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for a in json.loads(capture("approvals", "ls", "--json"))["approvals"]:
            if a.get("summary", {}).get("resource") == resource:
                return str(a["id"])
        if proc.poll() is not None:
            raise SystemExit("the agent ended before asking for approval")
        time.sleep(0.2)
    raise SystemExit(f"no approval request for {resource} appeared")


def main() -> None:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    say("1. Initialise a trust domain (keys 0600, SQLite store, audit log, first admin)")
    tether("init", "--trust-domain", "demo.tether.local")
    seed = [sys.executable, "-m", "tether.toolbox.sql", "--db", str(DEMO / "crm.db")]
    subprocess.run([*seed, "--seed-demo", "--seed-only"], check=True, stdout=subprocess.DEVNULL)
    with (HOME / "config.toml").open("a") as f:
        f.write(CRM_CONFIG.format(python=sys.executable, db=DEMO / "crm.db"))
    (HOME / "policies" / "40-crm.cedar").write_text(CRM_POLICY)
    print("a customers database (the bundled SQL MCP server) behind the tool gateway as 'crm';")
    print("policy: schema changes on it need a human's approval (policies/40-crm.cedar)")

    say("2. Start the server (authority + API + audit log), on TCP and a unix socket")
    log = (DEMO / "server.log").open("w")
    server = subprocess.Popen(
        [*TETHER, "serve", "--listen", "127.0.0.1:0"], env=ENV, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(server)
        print("server ready")

        say("3. Who am I? The human at the root of every delegation")
        tether("whoami")

        say("4. Delegate to an agent: narrow grants, a budget, a TTL and an attested objective")
        tether(
            "delegate",
            "--agent",
            "planner",
            "--grant",
            "model:gpt-4o*",
            "--grant",
            "tool:search.*",
            "--grant",
            "budget:tokens=20000",
            "--ttl",
            "20m",
            "--objective",
            "Produce the weekly churn-risk report from the customers DB",
            "--task",
            "churn-report-42",
            "--out",
            str(DEMO / "planner.jwt"),
        )

        say("5. The agent delegates onward to a sub-agent, narrowing again (hop 2)")
        tether(
            "delegate",
            "--agent",
            "researcher",
            "--from-token",
            str(DEMO / "planner.jwt"),
            "--grant",
            "model:gpt-4o-mini",
            "--grant",
            "tool:search.web",
            "--ttl",
            "10m",
            "--out",
            str(DEMO / "researcher.jwt"),
        )

        say("6. The sub-agent's identity carries its whole chain back to the human")
        tether("whoami", "--token", str(DEMO / "researcher.jwt"))

        say("7. A sub-agent cannot widen what it was given: refused, with the reason")
        tether(
            "delegate",
            "--agent",
            "rogue",
            "--from-token",
            str(DEMO / "researcher.jwt"),
            "--grant",
            "model:*",
            expect_fail=True,
        )

        say("8. The sub-agent calls a model with the unmodified OpenAI SDK, through the gateway")
        print(
            "(no upstream is configured, so the bundled, clearly labelled scripted model answers)"
        )
        researcher = agent_sdk(DEMO / "researcher.jwt")
        ask(researcher, "gpt-4o-mini", "Summarise churn drivers, then call search.web")
        say("9. The model proposes a tool outside the agent's grants: decided before the agent")
        print("sees it, and replaced by a refusal the agent can read")
        ask(researcher, "gpt-4o-mini", "call db.drop_table")
        say("10. A model outside the agent's grants is refused before any byte goes upstream")
        try:
            ask(researcher, "gpt-4o", "hello")
            raise SystemExit("a model outside the grants was not refused")
        except openai.PermissionDeniedError as e:
            print(f"refused: {e.status_code} {e.body}")
        tether("usage", "--by", "identity")

        say("11. Bound the swarm: at most 2 schema changes an hour for the whole group")
        (HOME / "policies" / "boundaries.toml").write_text(BOUNDARIES)
        print("wrote policies/boundaries.toml (groups, effects, a limit that escalates)")
        tether("users", "add", "bob")
        time.sleep(0.3)  # boundaries reload live (checked every 250 ms)
        replies = []
        for i in range(4):
            tether(
                "delegate",
                "--agent",
                f"indexer-{i}",
                "--grant",
                "model:gpt-4o-mini",
                "--grant",
                "tool:db.add_index",
                "--label",
                "swarm",
                "--task",
                "index-swarm",
                "--out",
                str(DEMO / f"indexer-{i}.jwt"),
            )
            replies.append(
                ask(
                    agent_sdk(DEMO / f"indexer-{i}.jwt"),
                    "gpt-4o-mini",
                    f"call db.add_index on orders.c{i}",
                )
            )
        pending = [
            r.split("needs approval ")[1].split()[0] for r in replies if "needs approval" in r
        ]
        print(f"{len(replies) - len(pending)} went through; {len(pending)} escalated")
        if len(pending) != 2:
            raise SystemExit("expected the group limit to escalate the last two")

        say("12. An SRE approves one of them; the agent's retry goes through, once")
        tether("approvals", "ls")
        bob = {**ENV, "TETHER_USER": "bob"}
        subprocess.run([*TETHER, "approvals", "approve", pending[0]], env=bob, cwd=DEMO, check=True)
        retry = ask(
            agent_sdk(DEMO / "indexer-2.jwt"), "gpt-4o-mini", "call db.add_index on orders.c2"
        )
        if "needs approval" in retry:
            raise SystemExit("the approved action did not go through")

        say("13. A real agent in a beam: the unmodified OpenAI SDK, its model reached through")
        print("Tether only (no network, read-only base, its own short-lived delegated token)")
        work = DEMO / "agent"
        work.mkdir(exist_ok=True)
        shutil.copy(ROOT / "scripts" / "agent_demo.py", work / "agent.py")
        shutil.copy(ROOT / "scripts" / "mcp_agent_demo.py", work / "mcp_agent.py")
        tether(
            "run",
            "--objective",
            "check the weather in Lisbon",
            "--grant",
            "model:tether-scripted-1",
            "--grant",
            "tool:get_weather",
            "--ttl",
            "2m",
            "--workspace",
            str(work),
            "--",
            "python",
            "agent.py",
        )
        beams = json.loads(capture("beam", "ls", "--json"))["beams"]
        say("14. The beam's objective attestation, proved against the signed audit log")
        time.sleep(0.6)  # let the checkpointer sign it
        tether("beam", "show", beams[0]["id"])

        say("15. An MCP agent in a beam reads customer rows through the tool gateway; a write")
        print("tool outside its grants is refused; a schema change waits for a human's approval")
        run = subprocess.Popen(
            [
                *TETHER,
                "run",
                "--objective",
                "weekly churn-risk report from the CRM",
                "--grant",
                "tool:crm.query",
                "--grant",
                "tool:crm.list_tables",
                "--grant",
                "tool:crm.create_index",
                "--ttl",
                "3m",
                "--workspace",
                str(work),
                "--",
                "python",
                "mcp_agent.py",
            ],
            env=ENV,
            cwd=DEMO,
        )
        approval = wait_for_approval("crm.create_index", run)
        print(f"{DIM}(the call is held; bob, a human, approves {approval}){RESET}")
        subprocess.run([*TETHER, "approvals", "approve", approval], env=bob, cwd=DEMO, check=True)
        if run.wait(timeout=120) != 0:
            raise SystemExit("the MCP agent failed")
        print("each tool's definition was pinned on first sight: a server that changes one later")
        print("has it blocked until a person re-approves it (tether tools approve crm TOOL)")
        tether("tools", "ls")

        say("16. Revoke the planner's token: everything delegated from it dies with it")
        tether("revoke", "--token", str(DEMO / "planner.jwt"), "--reason", "demo incident")
        tether("whoami", "--token", str(DEMO / "researcher.jwt"), expect_fail=True)

        say("17. The session timeline, from the tamper-evident audit log")
        tether("audit", "session", "churn-report-42")

        say("18. Verify the whole log: Merkle tree, signed checkpoints")
        time.sleep(0.6)  # let the checkpointer sign the latest entries
        tether("audit", "verify")
        tether("audit", "checkpoint", "--out", str(DEMO / "checkpoint.txt"))
        tether("audit", "export", "--format", "jsonl", "--out", str(DEMO / "export.jsonl"))

        say("19. An auditor checks the export with no Tether code (stdlib + cryptography)")
        vkey = (HOME / "keys" / "audit-note.vkey").read_text().strip()
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "verify_log.py"),
            "--log",
            str(DEMO / "export.jsonl"),
            "--checkpoint",
            str(DEMO / "checkpoint.txt"),
            "--key",
            vkey,
        ]
        shown = "--log export.jsonl --checkpoint checkpoint.txt"
        print(f"{DIM}$ python tools/verify_log.py {shown} --key '{vkey}'{RESET}")
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("standalone verification failed")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    say("Done. Everything above is in .demo/ (data dir .demo/home).")


if __name__ == "__main__":
    main()
