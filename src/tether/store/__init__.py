"""Persistence for identities, local credentials and revocations (SQLite by default).

The audit log keeps its own file (see :mod:`tether.audit`): it has one writer thread with its
own commit cadence, and separating the files keeps its group commit independent of these
low-rate writes.
"""

from tether.store.db import IdentityRecord, Store, UserRecord

__all__ = ["IdentityRecord", "Store", "UserRecord"]
