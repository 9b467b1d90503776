"""The finalizer's telemetry: a ``budget.settle`` span per settlement, ``budget.renew`` spans, and
the metrics (settlements by reason and outcome, spend by rule, ledger latency, queue depth).

Settle and renew spans start traces of their own: the request's span ended long ago. The link to
the reserve span (and the request's trace id attribute) ties them back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Link, Span, SpanContext, Status, StatusCode

from .. import telemetry
from ..amounts import format_micros
from ..identity import EntityHasher
from ..ledger import Renewed, Settled, Settlement
from ..telemetry import ATTR, EVENT_OVERRUN, SPAN_RENEW, SPAN_SETTLE, instruments, metrics_recorded
from ._counters import Counters

__all__ = ["Recorder"]

logger = logging.getLogger("budget_middleware")

OnSettled = Callable[[Settlement, Settled], None]


class Recorder:
    """Counts, traces and reports every settlement the ledger answered, and every renewal."""

    def __init__(
        self,
        counts: Counters,
        *,
        hasher: EntityHasher,
        span_raw_ids: bool,
        on_settled: OnSettled | None,
    ) -> None:
        self._counts = counts
        self._hasher = hasher
        self._span_raw_ids = span_raw_ids
        self.on_settled = on_settled

    def settled(self, s: Settlement, result: Settled, started_ns: int) -> None:
        """Counts an applied settlement, then traces it; a span processor or metric reader that
        raises is logged, never passed on to whoever handed the settlement over."""
        outcome = result.outcome
        counts = self._counts
        counts.applied += 1
        outcomes = counts.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        try:
            self._traced(s, result, outcome, started_ns)
        except Exception:
            logger.exception("budget: recording settlement %s failed", s.reservation_id)

    def _traced(self, s: Settlement, result: Settled, outcome: str, started_ns: int) -> None:
        if metrics_recorded():  # no calls that would do nothing while no meter provider is set
            inst = instruments()
            inst.settlements.add(1, _settlement_attrs(s.reason, outcome))
            if s.actual:
                for hb, o in zip(s.holds, result.outcomes, strict=False):
                    if o == "applied" or o == "late" or o == "recovered":
                        inst.spend.add(s.actual, _rule_attrs(hb.budget.rule))
        context = s.context
        if context is INVALID_SPAN_CONTEXT or (
            isinstance(context, SpanContext) and not context.is_valid
        ):
            # Its reserve span was not recorded: no tracing SDK was installed, so neither would
            # this one be. Skip the no-op span on the hot path.
            if self.on_settled is not None or outcome == "recovered" or outcome == "stale":
                self._report(s, result, outcome)
            return
        links = [Link(context)] if isinstance(context, SpanContext) else []
        span = telemetry.tracer.start_span(
            SPAN_SETTLE, context=_ROOT, links=links, start_time=started_ns
        )
        if span.is_recording():  # build attributes only for a span somebody records
            span.set_attributes(self._settle_attributes(s, outcome))
            if s.actual > s.estimate:
                span.add_event(EVENT_OVERRUN, {ATTR.OVERRUN: s.actual - s.estimate})
        span.end()
        self._report(s, result, outcome)

    def _settle_attributes(self, s: Settlement, outcome: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            ATTR.RESERVATION_ID: s.reservation_id,
            ATTR.REASON: s.reason,
            ATTR.ESTIMATE: s.estimate,
            ATTR.ACTUAL: s.actual,
            ATTR.RELEASED: max(0, s.estimate - s.actual),
            ATTR.OUTCOME: outcome,
            ATTR.LATE: outcome == "late",
            ATTR.RETRIES: s.attempts,
            ATTR.RULES: [hb.budget.rule for hb in s.holds],
            ATTR.ENTITIES: [
                hb.budget.entity if self._span_raw_ids else self._hasher.for_span(hb.budget.entity)
                for hb in s.holds
            ],
        }
        if s.trace_id:
            attrs[ATTR.TRACE_ID] = s.trace_id
        if s.actual > s.estimate:
            attrs[ATTR.OVERRUN] = s.actual - s.estimate
        return attrs

    def _report(self, s: Settlement, result: Settled, outcome: str) -> None:
        if outcome in ("recovered", "stale"):
            logger.warning(
                "budget: settlement %s was %s (reason %s, actual %s)",
                s.reservation_id,
                outcome,
                s.reason,
                format_micros(s.actual),
            )
        if self.on_settled is not None:
            try:
                self.on_settled(s, result)
            except Exception:
                logger.exception("budget: on_settled hook failed")

    @staticmethod
    def batch_sent(started: float, size: int) -> None:
        """A settle batch the ledger answered: its latency, and the queue ``size`` shorter."""
        inst = instruments()
        inst.ledger_duration.record(time.perf_counter() - started, {ATTR.OPERATION: "settle"})
        inst.queue.add(-size)

    @contextmanager
    def renewal(self, count: int) -> Iterator[Span]:
        """The ``budget.renew`` span around renewing ``count`` leases."""
        with telemetry.tracer.start_as_current_span(SPAN_RENEW, context=_ROOT) as span:
            span.set_attribute(ATTR.COUNT, count)
            yield span

    @staticmethod
    def renewed(span: Span, renewed: Renewed, started: float) -> None:
        span.set_attribute(ATTR.RENEWED, renewed.renewed)
        span.set_attribute(ATTR.REHELD, renewed.reheld)
        span.set_attribute(ATTR.MISSING, renewed.missing)
        instruments().ledger_duration.record(time.perf_counter() - started, {ATTR.OPERATION: "extend"})

    @staticmethod
    def renewal_failed(span: Span, count: int, exc: BaseException) -> None:
        span.set_status(Status(StatusCode.ERROR, str(exc) or "timeout"))
        logger.warning("budget: lease renewal of %d failed (%s)", count, exc)


# Metric attributes, built once per value: the settlement counter's by reason and outcome (a
# handful of each), the spend counter's by rule.
_ATTRS_CACHE_SIZE = 1024
_settlement_attrs_cache: dict[tuple[str, str], dict[str, str]] = {}
_rule_attrs_cache: dict[str, dict[str, str]] = {}


def _settlement_attrs(reason: str, outcome: str) -> dict[str, str]:
    attrs = _settlement_attrs_cache.get((reason, outcome))
    if attrs is None:
        if len(_settlement_attrs_cache) >= _ATTRS_CACHE_SIZE:
            _settlement_attrs_cache.clear()
        attrs = _settlement_attrs_cache[reason, outcome] = {ATTR.REASON: reason, ATTR.OUTCOME: outcome}
    return attrs


def _rule_attrs(rule: str) -> dict[str, str]:
    attrs = _rule_attrs_cache.get(rule)
    if attrs is None:
        if len(_rule_attrs_cache) >= _ATTRS_CACHE_SIZE:
            _rule_attrs_cache.clear()
        attrs = _rule_attrs_cache[rule] = {ATTR.RULE: rule}
    return attrs


_ROOT = trace.set_span_in_context(trace.INVALID_SPAN)
