"""What becomes of a call whose audit record cannot be written: the audit-failure policy
(``fail_closed`` or ``fail_open`` for decisions; a change is never acknowledged)."""
from __future__ import annotations

import asyncio
import logging

from ..errors import AuditUnavailable
from .audit import AuditLog
from .metrics import Metrics

log = logging.getLogger(__name__)

AUDIT_FAILURE_POLICIES = ("fail_closed", "fail_open")


class Auditor:
    """Appends audit records off the event loop and applies the audit-failure policy."""

    def __init__(self, audit: AuditLog | None, metrics: Metrics,
                 audit_failure: str = "fail_closed") -> None:
        if audit_failure not in AUDIT_FAILURE_POLICIES:
            raise ValueError(f"audit_failure must be one of {AUDIT_FAILURE_POLICIES}, "
                             f"got: {audit_failure!r}")
        self.audit = audit
        self.metrics = metrics
        self.audit_failure = audit_failure

    async def record(self, kind: str, **fields) -> None:
        """Append one audit record (ids, decision, scores only); durable on return.

        If the log cannot be written (disk full, I/O error): a change (enrol, remove) is
        refused with AuditUnavailable, it is stored but not acknowledged and a retry is
        idempotent; a decision is refused too under ``audit_failure="fail_closed"`` (the
        default), or answered unaudited under ``"fail_open"`` (logged and counted).
        """
        if self.audit is None:
            return
        try:
            await asyncio.to_thread(self.audit.append, kind, **fields)
        except AuditUnavailable as exc:
            self.metrics.count_audit_failure()
            if kind != "decision":
                raise AuditUnavailable(f"{exc}; the change is stored but not acknowledged: "
                                       f"retry once the log can be written") from None
            if self.audit_failure == "fail_open":
                log.error("decision answered without its audit record (%s; "
                          "audit_failure=fail_open)", exc)
                return
            raise AuditUnavailable(f"{exc}; decisions are refused until it can be written "
                                   f"(audit_failure=fail_closed)") from None
