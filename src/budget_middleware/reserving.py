"""The reserve of a request's holds: with a timeout, inside its ``budget.reserve`` span.

A reserve whose outcome is unknown (the ledger failed or timed out, or the request was cancelled
while it ran) is followed by a release of whatever it may have held, handed to the finalizer.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Span, Status, StatusCode

from .config import BudgetConfig
from .finalizer import Finalizer
from .identity import EntityHasher
from .ledger import (
    HeldBudget,
    HoldRequest,
    Ledger,
    LedgerError,
    LedgerNotSent,
    Rejection,
    Reservation,
    Settlement,
)
from .ledger._types import SyncLedger
from .telemetry import (
    ATTR,
    EVENT_HOLD_EXPIRED,
    INVALID_SPAN,
    SPAN_RESERVE,
    instruments,
    metrics_recorded,
    spans_recorded,
    tracer,
)

__all__ = ["OUTCOME_ATTRS", "Reserver"]

logger = logging.getLogger("budget_middleware")

# Built once: the attributes of the reservation counter, by outcome.
OUTCOME_ATTRS = {
    outcome: {ATTR.OUTCOME: outcome} for outcome in ("admitted", "rejected", "unavailable", "bypassed")
}


class Reserver:
    """Reserves in one ledger for one middleware; releases through its finalizer."""

    def __init__(
        self, ledger: Ledger, finalizer: Finalizer, hasher: EntityHasher, config: BudgetConfig
    ) -> None:
        self._ledger = ledger
        self._finalizer = finalizer
        self._hasher = hasher
        self._config = config
        self._lease_ms = config.lease_ms
        self._timeout_s = config.timeout_ms / 1000
        # A ledger that reserves synchronously (memory) is called without a timeout or an await.
        self._now = ledger.reserve_now if isinstance(ledger, SyncLedger) else None

    async def reserve(
        self, rid: str, requests: list[HoldRequest], estimate: int
    ) -> tuple[Reservation | Rejection, trace.SpanContext] | None:
        """Reserve with a timeout, inside a ``budget.reserve`` span; None if the ledger failed.

        The span is a child of the request's span but is not made current: nothing inside needs
        it, and attaching a context costs more than the memory ledger's whole reserve.
        """
        # Without a tracer provider the span is the invalid one, whose calls below do nothing.
        span = tracer.start_span(SPAN_RESERVE) if spans_recorded(tracer) else INVALID_SPAN
        recording = span is not INVALID_SPAN and span.is_recording()
        if recording:
            span.set_attributes(
                {
                    ATTR.RESERVATION_ID: rid,
                    ATTR.RULES: [r.budget.rule for r in requests],
                    ATTR.ENTITIES: [self._span_entity(r.budget.entity) for r in requests],
                    ATTR.ESTIMATE: estimate,
                    ATTR.UNIT: self._config.unit,
                }
            )
        try:
            if self._now is not None:  # memory: cannot block, so no timeout to arm
                result = self._now(rid, requests, self._lease_ms)
            elif asyncio._get_running_loop() is not None:
                async with asyncio.timeout(self._timeout_s):
                    result = await self._ledger.reserve(rid, requests, self._lease_ms)
            else:  # anyio's other backend (trio)
                with anyio.fail_after(self._timeout_s):
                    result = await self._ledger.reserve(rid, requests, self._lease_ms)
        except (LedgerError, TimeoutError, OSError) as exc:
            # The reserve may have run on the server: release whatever it may have held, unless
            # it provably never reached the store.
            self._release_unknown(
                rid, requests, "unavailable", never_sent=isinstance(exc, LedgerNotSent)
            )
            span.set_attribute(ATTR.OUTCOME, "unavailable")
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            instruments().reservations.add(1, OUTCOME_ATTRS["unavailable"])
            logger.warning("budget: reserve failed (%s: %s)", type(exc).__name__, exc)
            return None
        except BaseException:
            self._release_unknown(rid, requests, "cancelled")
            span.set_attribute(ATTR.OUTCOME, "cancelled")
            span.end()
            raise
        # The holds exist from here on, and the middleware's settling try is not open yet: nothing
        # of the telemetry (a span processor, a metric reader) may raise out of here.
        try:
            return result, self._recorded(span, recording, result)
        except Exception:
            logger.exception("budget: recording the reserve of %s failed", rid)
            return result, INVALID_SPAN_CONTEXT

    def _recorded(
        self, span: Span, recording: bool, result: Reservation | Rejection
    ) -> trace.SpanContext:
        """Counts the reserve, ends its span; the span context the settlement links to."""
        outcome = "admitted" if result.admitted else "rejected"
        if metrics_recorded():  # no calls that would do nothing while no meter provider is set
            inst = instruments()
            if result.expired_ids:
                inst.holds_expired.add(len(result.expired_ids))
            inst.reservations.add(1, OUTCOME_ATTRS[outcome])
        if span is INVALID_SPAN:  # nothing to record or end
            # The request's own context, valid when an upstream trace was propagated (API-only
            # instrumentation): the on_settled hook still sees the request's trace id.
            if self._finalizer.on_settled is None:
                return INVALID_SPAN_CONTEXT
            return trace.get_current_span().get_span_context()
        for expired in result.expired_ids:
            span.add_event(EVENT_HOLD_EXPIRED, {ATTR.RESERVATION_ID: expired})
        if recording:
            span.set_attribute(ATTR.OUTCOME, outcome)
            span.set_attribute(ATTR.PURGED, result.purged)
            if isinstance(result, Reservation):
                span.set_attribute(ATTR.LIMITS, [h.limit for h in result.holds])
                span.set_attribute(ATTR.REMAINING, [h.remaining for h in result.holds])
            else:
                span.set_attribute(ATTR.VIOLATED, [v.budget.rule for v in result.violations])
                span.set_attribute(ATTR.LIMITS, [v.limit for v in result.violations])
                span.set_attribute(ATTR.REMAINING, [v.remaining for v in result.violations])
        span.end()
        return span.get_span_context()

    def _span_entity(self, token: str) -> str:
        return token if self._config.span_raw_ids else self._hasher.for_span(token)

    def _release_unknown(
        self, rid: str, requests: list[HoldRequest], reason: str, *, never_sent: bool = False
    ) -> None:
        holds = tuple(HeldBudget(r.budget, r.amount, -1, "", r.limit, 0, None) for r in requests)
        estimate = requests[0].amount if requests else 0
        release = Settlement(rid, holds, 0, f"release-{reason}", estimate, never_sent=never_sent)
        self._finalizer.submit(release)
