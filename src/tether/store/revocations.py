"""Keeps a :class:`RevocationList` in step with the store, for every process that verifies.

Revocations made in this process reach its verifiers at once (the authority adds them
directly); revocations made by another process sharing the store arrive within one poll.
"""

from __future__ import annotations

import logging
import threading

from tether.errors import TetherError
from tether.identity.revocation import RevocationList
from tether.store.db import Store

__all__ = ["REVOCATION_POLL_SECONDS", "RevocationPoller"]

log = logging.getLogger("tether.store")

REVOCATION_POLL_SECONDS = 0.25


class RevocationPoller:
    def __init__(
        self, store: Store, revocations: RevocationList, interval: float = REVOCATION_POLL_SECONDS
    ) -> None:
        self.store = store
        self.revocations = revocations
        self.interval = interval
        self._stop = threading.Event()
        self.poll()  # start from everything revoked so far
        self._thread = threading.Thread(target=self._run, name="tether-revocations", daemon=True)
        self._thread.start()

    def poll(self) -> int:
        """Fetch revocations newer than the last seen; returns how many arrived."""
        fresh = self.store.revocations_since(self.revocations.last_seq)
        if fresh:
            self.revocations.add_all(fresh)
        return len(fresh)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except TetherError as e:
                log.warning("revocation poll failed: %s", e.message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
