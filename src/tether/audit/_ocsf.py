"""Mapping of audit entries to OCSF 1.1 events (``tether audit export --format ocsf``).

=====================  =========================================================================
entry                  OCSF
=====================  =========================================================================
``identity.*``         class 3002 *Authentication* (category 3, Identity & Access Management):
                       ``identity.login`` -> activity 1 Logon; ``identity.issued`` /
                       ``identity.delegated`` / ``identity.refused`` / ``identity.x509_issued`` ->
                       3 Authentication Ticket; others (``identity.revoked``) -> 99 Other.
                       ``user`` is the subject the event is about.
anything else          class 6003 *API Activity* (category 6, Application Activity): a type
                       ending ``.create`` / ``.read`` / ``.get`` / ``.list`` / ``.update`` /
                       ``.delete`` -> 1 / 2 / 2 / 2 / 3 / 4, others (``llm.invoke``,
                       ``tool.call``) -> 99 Other; ``api.operation`` is the entry type.
``time_ms``            ``time`` (epoch milliseconds, as OCSF wants)
``actor``              ``actor.user`` (``uid`` the SPIFFE ID, ``name`` its last path segment)
``decision``           ``status``: allow -> Success (1), deny -> Failure (2), escalate / error ->
                       Other (99), none -> Success; ``severity``: deny / escalate -> Medium (3),
                       error -> High (4), else Informational (1)
``session``            ``metadata.correlation_uid``
``index``              ``metadata.sequence``; ``metadata.uid`` is ``<origin>#<index>``
the rest               ``unmapped.tether``: index, type, decision, session, subject, data,
                       bodies (SHA-256 digests), so nothing in the entry is lost
=====================  =========================================================================

``src_endpoint`` is left out: the log records identities, not network addresses.
"""

from __future__ import annotations

from typing import Any

import tether

__all__ = ["OCSF_VERSION", "to_ocsf"]

OCSF_VERSION = "1.1.0"

_AUTH = (3002, "Authentication", 3, "Identity & Access Management")
_API = (6003, "API Activity", 6, "Application Activity")
_AUTH_ACTIVITY = {
    "identity.login": (1, "Logon"),
    "identity.issued": (3, "Authentication Ticket"),
    "identity.delegated": (3, "Authentication Ticket"),
    "identity.refused": (3, "Authentication Ticket"),
    "identity.x509_issued": (3, "Authentication Ticket"),
}
_API_ACTIVITY = {
    "create": (1, "Create"),
    "read": (2, "Read"),
    "get": (2, "Read"),
    "list": (2, "Read"),
    "update": (3, "Update"),
    "delete": (4, "Delete"),
}
_STATUS = {"allow": (1, "Success"), "deny": (2, "Failure")}
_SEVERITY = {"deny": (3, "Medium"), "escalate": (3, "Medium"), "error": (4, "High")}


def _user(spiffe_id: str) -> dict[str, Any]:
    path = spiffe_id.split("://", 1)[-1].split("/")
    user: dict[str, Any] = {"uid": spiffe_id, "name": path[-1]}
    kind = path[1] if len(path) > 2 else ""
    if kind == "user":
        user.update(type_id=1, type="User")
    elif kind in ("agent", "beam", "service"):
        user.update(type_id=99, type=kind.capitalize())
    return user


def to_ocsf(entry: dict[str, Any], origin: str) -> dict[str, Any]:
    """One OCSF event for one audit entry (the parsed canonical JSON)."""
    type_ = str(entry.get("type", ""))
    decision = entry.get("decision")
    if type_.startswith("identity."):
        class_uid, class_name, category_uid, category_name = _AUTH
        activity_id, activity_name = _AUTH_ACTIVITY.get(type_, (99, "Other"))
    else:
        class_uid, class_name, category_uid, category_name = _API
        verb = type_.rsplit(".", 1)[-1]
        activity_id, activity_name = _API_ACTIVITY.get(verb, (99, "Other"))
    status_id, status = (
        _STATUS.get(decision, (99, "Other")) if decision is not None else (1, "Success")
    )
    severity_id, severity = _SEVERITY.get(str(decision), (1, "Informational"))
    event: dict[str, Any] = {
        "category_uid": category_uid,
        "category_name": category_name,
        "class_uid": class_uid,
        "class_name": class_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "time": entry.get("time_ms"),
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "message": type_,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "Tether", "vendor_name": "Tether", "version": tether.__version__},
            "log_name": origin,
            "uid": f"{origin}#{entry.get('index')}",
            "sequence": entry.get("index"),
        },
        "unmapped": {
            "tether": {
                k: entry[k]
                for k in ("index", "type", "decision", "session", "subject", "data", "bodies")
                if k in entry
            }
        },
    }
    if entry.get("session") is not None:
        event["metadata"]["correlation_uid"] = entry["session"]
    if entry.get("actor") is not None:
        event["actor"] = {"user": _user(str(entry["actor"]))}
    if class_uid == 3002:
        if entry.get("subject") is not None:
            event["user"] = _user(str(entry["subject"]))
    else:
        event["api"] = {"operation": type_, "service": {"name": "tether"}}
    return event
