"""Tether's published Cedar schema and the facts the engine derives from it.

The schema itself is ``tether.cedarschema`` next to this module (Cedar human-readable schema
format); ``defaults.cedar`` holds the default policies. This module names the entity types,
the action -> resource type mapping, and the typed context fields, so the engine builds
requests that always conform to the schema (a test keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Literal

import cedarpy

__all__ = [
    "ACTION_ENTITY",
    "CONTEXT_FIELDS",
    "DEFAULTS_PATH",
    "KNOWN_ANNOTATIONS",
    "NAMESPACE",
    "PRINCIPAL_TYPES",
    "REQUIRED_CONTEXT",
    "RESOURCE_TYPE_OF",
    "SCHEMA_PATH",
    "ContextType",
    "defaults_text",
    "schema",
    "schema_text",
]

NAMESPACE = "Tether"
ACTION_ENTITY = f"{NAMESPACE}::Action"

SCHEMA_PATH = Path(__file__).with_name("tether.cedarschema")
DEFAULTS_PATH = Path(__file__).with_name("defaults.cedar")

# SPIFFE identity kind -> Cedar entity type.
PRINCIPAL_TYPES: Mapping[str, str] = {
    "user": f"{NAMESPACE}::User",
    "agent": f"{NAMESPACE}::Agent",
    "beam": f"{NAMESPACE}::Beam",
    "service": f"{NAMESPACE}::Service",
}

# Action type -> resource entity type. ``identity.delegate`` takes the delegatee's identity
# type (from its SPIFFE ID), so it is absent here.
RESOURCE_TYPE_OF: Mapping[str, str] = {
    "llm.invoke": f"{NAMESPACE}::Model",
    "tool.call": f"{NAMESPACE}::Tool",
    "http.request": f"{NAMESPACE}::HttpService",
    "egress.connect": f"{NAMESPACE}::Domain",
    "beam.create": f"{NAMESPACE}::Beam",
}

GROUP_TYPE = f"{NAMESPACE}::Group"

ContextType = Literal["Bool", "Long", "String", "Set<String>"]

# Every context field the schema declares, with its type. Keys an action carries that are not
# here are dropped before Cedar sees them.
CONTEXT_FIELDS: Mapping[str, ContextType] = {
    "granted": "Bool",
    "granted_by": "String",
    "hour": "Long",
    "max_tokens": "Long",
    "stream": "Bool",
    "tools": "Set<String>",
    "estimated_tokens": "Long",
    "effects": "Set<String>",
    "arguments_digest": "String",
    "method": "String",
    "path": "String",
    "port": "Long",
}
REQUIRED_CONTEXT: tuple[str, ...] = ("granted", "hour")

# Annotations Tether reads. Any other annotation is refused (a typo such as ``@escalte``
# would otherwise silently turn an escalation into a plain permit).
KNOWN_ANNOTATIONS: frozenset[str] = frozenset({"id", "reason", "escalate", "description"})


@cache
def schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


@cache
def defaults_text() -> str:
    return DEFAULTS_PATH.read_text(encoding="utf-8")


@cache
def schema() -> cedarpy.Schema:
    """The parsed schema handle (parsed once per process)."""
    return cedarpy.Schema.from_str(schema_text())
