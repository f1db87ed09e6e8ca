"""A stdio MCP server (official SDK) the gateway launches in tests.

``TETHER_TEST_STDIO_MODE``: ``normal``; ``hang`` (never answers initialize); ``noisy`` (writes
a non-JSON line and a server-to-client request before serving).
"""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer

MODE = os.environ.get("TETHER_TEST_STDIO_MODE", "normal")

if MODE == "hang":
    sys.stdin.readline()
    time.sleep(3600)

if MODE == "noisy":
    sys.stdout.write("this is not json\n")
    sys.stdout.write('{"jsonrpc":"2.0","id":"srv-1","method":"roots/list"}\n')
    sys.stdout.flush()

srv = MCPServer("files", log_level="WARNING")


@srv.tool(description="Read a file from the shared workspace.")
def read_file(path: str) -> str:
    return f"contents of {path}"


@srv.tool(description="The names of this process's environment variables.")
def env_keys() -> str:
    return ",".join(sorted(os.environ))


@srv.tool(description="This server's process id.")
def pid() -> str:
    return str(os.getpid())


@srv.tool(description="Exit the server process (to test restarts).")
def crash() -> str:
    os._exit(3)


srv.run("stdio")
