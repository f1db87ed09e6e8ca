"""Tether: a trust plane for AI agents.

Every agent action crosses one enforcement point and becomes a decision that is checked
against a delegated identity and policy first, and recorded in a tamper-evident log after.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
