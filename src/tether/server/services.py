"""Builds the running parts from a data directory, and initialises a new one."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from tether.audit.log import AuditLog, SyncMode
from tether.audit.note import NoteSigner
from tether.clock import Clock, SystemClock
from tether.config import Config, DataDir, validate_trust_domain, write_private
from tether.errors import ConfigError
from tether.events import Event
from tether.identity.authority import ADMIN_GRANTS, Authority
from tether.identity.bundle import TrustBundle, build_bundle, parse_bundle
from tether.identity.keys import KeySet, load_or_create_keys
from tether.identity.revocation import RevocationList
from tether.identity.verifier import Verifier
from tether.policy.approvals import Approvals
from tether.policy.boundaries import BoundariesFile
from tether.policy.core import DecisionCore
from tether.policy.engine import PolicyEngine
from tether.policy.groups import Groups
from tether.policy.jit import DEFAULT_JIT_QUORUM, JitGrants
from tether.policy.limits import SqliteLimiter
from tether.store import Store
from tether.store.approvals import ApprovalStore
from tether.store.revocations import RevocationPoller

__all__ = ["InitResult", "Services", "init_data_dir"]


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    config: Config
    created: bool
    admin_credential_path: Path


def init_data_dir(root: Path, trust_domain: str, admin_user: str = "admin") -> InitResult:
    """Create a data directory, its keys, store and first admin user. Idempotent: never
    overwrites keys or credentials; refuses a different trust domain for an existing one."""
    validate_trust_domain(trust_domain)
    dd = DataDir(root)
    created = not dd.exists()
    if created:
        dd.write_config(Config(trust_domain=trust_domain, admin_user=admin_user))
    config = dd.load_config()
    if config.trust_domain != trust_domain:
        raise ConfigError(
            f"{root} already holds trust domain {config.trust_domain!r}, not {trust_domain!r}",
            hint="use another --data-dir for another trust domain",
        )
    dd.ensure_private_dirs()
    dd.policies.mkdir(exist_ok=True)
    keys, _ = load_or_create_keys(dd.keys, config.trust_domain, config.audit_origin)
    store = Store(dd.db_path)
    cred_path = dd.credentials / config.admin_user
    try:
        if store.get_user(config.admin_user) is None:
            credential = "tether_uc_" + secrets.token_urlsafe(32)
            store.add_user(config.admin_user, credential, ADMIN_GRANTS, 0)
            cred_path.unlink(missing_ok=True)
            write_private(cred_path, credential + "\n", overwrite=False)
    finally:
        store.close()
    if created:
        with _open_audit(dd, config, keys) as audit:
            audit.record(
                Event(
                    type="tether.initialized",
                    actor=f"spiffe://{trust_domain}/user/{config.admin_user}",
                    data={"trust_domain": trust_domain, "jwt_kid": keys.jwt_kid},
                )
            )
    return InitResult(root, config, created, cred_path)


def _open_audit(dd: DataDir, config: Config, keys: KeySet, clock: Clock | None = None) -> AuditLog:
    log_ = AuditLog(
        dd.audit_db_path,
        NoteSigner(config.audit_origin, keys.note_key),
        config.audit_origin,
        clock=clock or SystemClock(),
        checkpoint_interval=config.checkpoint_interval,
        sync=cast(SyncMode, config.audit_sync),
    )
    log_.start()
    return log_


class Services:
    """Everything one Tether process runs, built from a data directory."""

    def __init__(self, root: Path, clock: Clock | None = None) -> None:
        self.data_dir = DataDir(root)
        self.config = self.data_dir.load_config()
        self.clock = clock or SystemClock()
        self.keys, _ = load_or_create_keys(
            self.data_dir.keys, self.config.trust_domain, self.config.audit_origin
        )
        self.store = Store(self.data_dir.db_path)
        self.audit = _open_audit(self.data_dir, self.config, self.keys, self.clock)
        self.revocations = RevocationList()
        self.poller = RevocationPoller(self.store, self.revocations)
        self.bundle_doc = build_bundle(self.keys)
        self.bundle: TrustBundle = parse_bundle(self.bundle_doc, self.config.trust_domain)
        self.verifier = Verifier(
            self.bundle,
            audience=self.config.audience,
            revocations=self.revocations,
            clock=self.clock,
        )
        self.authority = Authority(
            self.config, self.keys, self.store, self.audit, self.revocations, self.clock
        )
        self._build_decision_core()

    def _build_decision_core(self) -> None:
        """Policy (Cedar, live reload), groups and limits (boundaries.toml, exact across
        processes), approvals and JIT grants, composed into the one decision core."""
        policy_conf = self.config.extra.get("policy", {})
        self.data_dir.policies.mkdir(exist_ok=True)
        self.policy = PolicyEngine.from_data_dir(self.data_dir)
        self.boundaries = BoundariesFile(self.data_dir.policies / "boundaries.toml")
        self.groups = Groups(self.boundaries)
        self.limiter = SqliteLimiter(
            self.data_dir.limits_db_path, self.boundaries, clock=self.clock
        )
        self.approval_store = ApprovalStore(self.data_dir.db_path)
        self.approvals = Approvals(
            self.approval_store, self.audit, groups_of=self.groups.groups_of, clock=self.clock
        )
        self.jit = JitGrants(
            self.approvals, quorum=str(policy_conf.get("jit_quorum", DEFAULT_JIT_QUORUM))
        )
        self.core = DecisionCore(
            self.policy,
            groups=self.groups,
            limiter=self.limiter,
            approvals=self.approvals,
            extra_grants=self.jit.active_grants,
            clock=self.clock,
        )

    def __repr__(self) -> str:
        return f"Services(data_dir={str(self.data_dir.root)!r})"

    def ready(self) -> dict[str, object]:
        """Readiness: the store answers and the audit log accepts writes."""
        self.store.revocations_since(self.revocations.last_seq)
        return {"status": "ready", "audit_size": self.audit.size()}

    def close(self) -> None:
        self.poller.close()
        self.limiter.close()
        self.approval_store.close()
        self.audit.close()
        self.store.close()
