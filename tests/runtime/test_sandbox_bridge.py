"""The beam's only way out: the forwarder inside relays 127.0.0.1:<port> to the host's unix
socket. Unmodified HTTP clients (urllib, http.client keep-alive, the OpenAI SDK) reach a
real uvicorn server on the host, and nothing else."""

from __future__ import annotations

from pathlib import Path

from tests.runtime.conftest import PRELUDE, Beams, beam_env, serve_unix


async def test_openai_sdk_inside_reaches_the_host_server(beams: Beams) -> None:
    ran = await beams.py(
        """
import json, openai
client = openai.OpenAI()  # configured only by the environment, as an agent would be
r = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
print(json.dumps([r.choices[0].message.content, r.usage.total_tokens]))
""",
        env=beam_env(OPENAI_BASE_URL="http://127.0.0.1:8080/v1", OPENAI_API_KEY="beam-token-1"),
    )
    assert ran.result == ["hello from gateway", 4], ran.err
    (req,) = beams.bridge.seen.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer beam-token-1"


async def test_first_instruction_can_connect(beams: Beams) -> None:
    # The listener exists before the command starts: no retry, no wait.
    for _ in range(3):
        ran = await beams.run(
            [
                "python3",
                "-I",
                "-S",
                "-c",
                "import socket; s = socket.create_connection(('127.0.0.1', 8080)); "
                "s.sendall(b'GET /first HTTP/1.1\\r\\nHost: x\\r\\n"
                "Connection: close\\r\\n\\r\\n'); "
                "print(s.recv(100).split(b' ')[1].decode())",
            ]
        )
        assert ran.out.strip() == "200", ran.err
    assert [r["path"] for r in beams.bridge.seen.requests] == ["/first"] * 3


async def test_keep_alive_large_bodies_and_concurrency(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
import hashlib, http.client, threading
c = http.client.HTTPConnection("127.0.0.1", 8080)
paths = []
for i in range(50):  # one connection, fifty requests
    c.request("GET", f"/n/{i}")
    paths.append(json.loads(c.getresponse().read())["path"])
note("keepalive", paths == [f"/n/{i}" for i in range(50)])
big = os.urandom(5 << 20)
c.request("POST", "/echo", body=big)
note("echo", hashlib.sha256(c.getresponse().read()).hexdigest() == hashlib.sha256(big).hexdigest())
c.request("GET", "/bytes/3000000")
note("download", len(c.getresponse().read()))
results = []
def one(i):
    k = http.client.HTTPConnection("127.0.0.1", 8080)
    k.request("POST", "/echo", body=str(i) * 1000)
    results.append(k.getresponse().read() == str(i).encode() * 1000)
threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
[t.start() for t in threads]
[t.join() for t in threads]
note("parallel", [len(results), all(results)])
done()
"""
    )
    assert ran.result == {
        "keepalive": True,
        "echo": True,
        "download": 3000000,
        "parallel": [32, True],
    }


async def test_egress_port_reaches_the_egress_socket(beams: Beams, short_dir: Path) -> None:
    async with serve_unix(short_dir / "eg.sock", "egress") as egress:
        ran = await beams.py(
            """
import json, urllib.request
a = json.loads(urllib.request.urlopen("http://127.0.0.1:8080/a").read())
b = json.loads(urllib.request.urlopen("http://127.0.0.1:3128/b").read())
print(json.dumps([a["server"], b["server"]]))
""",
            egress=egress.socket,
        )
    assert ran.result == ["gateway", "egress"]
    assert [r["path"] for r in egress.seen.requests] == ["/b"]


async def test_no_egress_listener_without_an_egress_socket(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE + "attempt('egress', lambda: socket.create_connection(('127.0.0.1', 3128))); done()"
    )
    assert ran.result == {"egress": "ECONNREFUSED"}


async def test_gateway_gone_closes_the_connection_and_says_why(
    beams: Beams, short_dir: Path
) -> None:
    async with serve_unix(short_dir / "gone.sock", "gone") as gone:
        spec = beams.spec(
            [
                "python3",
                "-c",
                "import socket, os\n"
                "while not os.path.exists('/workspace/go'): pass\n"
                "s = socket.create_connection(('127.0.0.1', 8080))\n"
                "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
                "try:\n"
                "    print(repr(s.recv(100)))\n"
                "except ConnectionResetError as e:\n"
                "    print('reset')",
            ]
        )
        object.__setattr__(spec, "bridge_socket", gone.socket)
        sb = await beams.backend.start(spec)
        beams.started.append(sb)
    (beams.workspace / "go").touch()  # the host side has stopped listening
    ran = await beams.finish(sb)
    # the agent's connection is reset (or closed, if its request had not arrived yet)
    assert ran.out.strip() in ("reset", "b''"), ran.err
    assert (
        ran.err == "tether-forwarder: cannot reach /run/tether/gateway.sock: Connection refused\n"
    )
