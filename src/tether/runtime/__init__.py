"""Beam isolation: sandboxes that run an agent's command with nothing of the host but a bridge.

``sandbox`` is the seam (spec, protocols, :func:`get_backend`); ``bwrap`` is the default
backend (namespaces + seccomp + cgroups), ``runsc`` the gVisor one. The runtime depends on the
core (errors, config); the core never imports it.
"""

from tether.runtime.sandbox import (
    BACKENDS,
    Backend,
    Leftover,
    Limits,
    Sandbox,
    SandboxSpec,
    get_backend,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "Leftover",
    "Limits",
    "Sandbox",
    "SandboxSpec",
    "get_backend",
]
