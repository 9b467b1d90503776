"""OpenTelemetry names and instruments (ARCHITECTURE.md section 8).

The package depends on ``opentelemetry-api`` only: without an SDK every call below is a no-op.
This module imports nothing of the package.
"""

from __future__ import annotations

from opentelemetry import metrics, trace

try:  # the API's own state: read, never written, and only to skip work that would do nothing
    from opentelemetry.metrics import _internal as _metrics_state

    _PROXY_METER: type | None = _metrics_state._ProxyMeter
except (ImportError, AttributeError):  # pragma: no cover - a future API without these names
    _PROXY_METER = None

__all__ = [
    "ATTR",
    "INVALID_SPAN",
    "SPAN_RENEW",
    "SPAN_RESERVE",
    "SPAN_SETTLE",
    "Instruments",
    "instruments",
    "metrics_recorded",
    "spans_recorded",
    "tracer",
]

SPAN_RESERVE = "budget.reserve"
SPAN_SETTLE = "budget.settle"
SPAN_RENEW = "budget.renew"
EVENT_HOLD_EXPIRED = "budget.hold_expired"
EVENT_OVERRUN = "budget.overrun"


class ATTR:
    """Attribute keys: one set, in the ``budget.`` namespace."""

    RULES = "budget.rules"
    ENTITIES = "budget.entities"  # digests only, unless raw ids are enabled by the operator
    RESERVATION_ID = "budget.reservation_id"
    ESTIMATE = "budget.estimate"
    ACTUAL = "budget.actual"
    RELEASED = "budget.released"
    LIMITS = "budget.limits"
    REMAINING = "budget.remaining"
    OUTCOME = "budget.outcome"
    REASON = "budget.reason"
    VIOLATED = "budget.violated_rules"
    PURGED = "budget.purged"
    LATE = "budget.late"
    RETRIES = "budget.retries"
    TRACE_ID = "budget.request_trace_id"
    UNIT = "budget.unit"
    RULE = "budget.rule"
    COUNT = "budget.count"
    RENEWED = "budget.renewed"
    REHELD = "budget.reheld"
    MISSING = "budget.missing"
    OPERATION = "budget.operation"
    ERROR = "budget.error"
    OVERRUN = "budget.overrun"


tracer = trace.get_tracer("budget_middleware", "0.1.0")

INVALID_SPAN = trace.INVALID_SPAN


def spans_recorded(t: trace.Tracer) -> bool:
    """False when every span ``t`` starts is a no-op: ``t`` is the API's proxy tracer (what
    ``trace.get_tracer`` returns) and no tracer provider is installed yet.

    Starting a no-op span still looks up the current context, which costs the request path as much
    as the memory ledger's reserve, so the hot path asks this first. Asked on every request: a
    provider installed at any time gets its spans from the next request on. The public
    ``trace.get_tracer_provider()`` reads ``os.environ`` on every call until one is installed, so
    this reads the global the proxy tracer itself consults; should that private name ever go,
    every span is started, as before.
    """
    if type(t) is not trace.ProxyTracer:
        return True  # an SDK tracer, or one a test or an application passed in
    try:
        return trace._TRACER_PROVIDER is not None
    except AttributeError:
        return True


class Instruments:
    """The package's metrics, made once from the global meter provider."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("budget_middleware", "0.1.0")
        # The API's proxy meter, made while no meter provider is installed: its instruments do
        # nothing until one is (they then forward to it).
        self.proxied = _PROXY_METER is not None and isinstance(meter, _PROXY_METER)
        self.reservations = meter.create_counter(
            "budget.reservations", unit="{reservation}", description="reservations by outcome"
        )
        self.settlements = meter.create_counter(
            "budget.settlements", unit="{settlement}", description="settlements by reason"
        )
        self.spend = meter.create_counter(
            "budget.spend", unit="{micro-unit}", description="micro-units settled, by rule"
        )
        self.holds_expired = meter.create_counter(
            "budget.holds.expired", unit="{hold}", description="expired holds purged"
        )
        self.queue = meter.create_up_down_counter(
            "budget.finalizer.queue", unit="{settlement}", description="settlements pending"
        )
        self.ledger_duration = meter.create_histogram(
            "budget.ledger.duration", unit="s", description="ledger call latency by operation"
        )
        self.lost = meter.create_counter(
            "budget.settlements.lost",
            unit="{settlement}",
            description="settlements that could not be applied before the process ended",
        )


_instruments: Instruments | None = None


def instruments() -> Instruments:
    global _instruments
    if _instruments is None:
        _instruments = Instruments()
    return _instruments


def metrics_recorded() -> bool:
    """False when every call on ``instruments()`` would do nothing: they were made from the API's
    proxy meter and no meter provider is installed yet (as ``spans_recorded`` for spans).

    Asked once per reserve and per settlement, so that a request without an SDK makes no metric
    calls; a meter provider installed at any time gets the metrics from the next request on. Should
    the private name read here ever go, metrics are recorded, as before.
    """
    inst = _instruments
    if inst is None or not inst.proxied:
        return True
    try:
        return _metrics_state._METER_PROVIDER is not None
    except AttributeError:
        return True
