"""The tamper-evident audit log: RFC 9162 Merkle tree over RFC 8785 entries, C2SP checkpoints.

Public surface: :class:`AuditLog` (the recorder, proofs, queries, verification),
:class:`VerifyReport`, :func:`redact`, and the pure building blocks in :mod:`.merkle`,
:mod:`.note` and :mod:`.canonical`.
"""

from tether.audit.log import AuditLog, VerifyReport
from tether.audit.redact import redact

__all__ = ["AuditLog", "VerifyReport", "redact"]
