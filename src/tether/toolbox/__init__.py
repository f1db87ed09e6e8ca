"""Tool servers bundled with Tether: real data sources to put behind the tool gateway.

``python -m tether.toolbox.sql``: an MCP server over SQLite or PostgreSQL (docs/toolbox.md).
"""
