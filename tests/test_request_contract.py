"""The request contract on the memory ledger: every exit path settles once, with its reason and amount.

A request reserves once and settles once; on the memory ledger both are synchronous
(``reserve_now`` without an await, ``settle_now`` inside the finalizer's ``submit``). Each exit path
of issue 3's table runs three requests (alice, alice, bob) on a ledger with a fixed clock, so that
the RateLimit headers are exact, and the tests assert what the client was sent, what the
``on_settled`` hook received, the finalizer's counts and the budgets afterwards. Then: lifetime
budgets and a skipped second rule, a rejection, a ledger subclass that sees every call, spans and
metrics with an SDK installed (before or during a request), the Redis ledger, long streams kept
by renewal, interleaved requests, and no reference cycle through a finished request's scope.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_state
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

import budget_middleware.finalizer as finalizer_module
import budget_middleware.reserving as reserving_module
from asgi_helpers import (
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
    wait_until,
    without_telemetry_sdk,
)
from budget_middleware import (
    BudgetConfig,
    BudgetMiddleware,
    Finalizer,
    MemoryLedger,
    Rule,
    Settlement,
    get_reservation,
    telemetry,
)
from budget_middleware.budgets import Budget

# A fixed ledger clock, so that RateLimit's t= is known; near the ids' own time, so no settle is
# refused as stale.
NOW_MS = time.time_ns() // 1_000_000
DAY_MS = 86_400_000
RESET_S = -(-(DAY_MS - NOW_MS % DAY_MS) // 1000)  # seconds to the end of NOW_MS's UTC day
LIMIT = 10_000_000  # 10 units, in micro-units
ESTIMATE = 2_000_000  # 2 units


@pytest.fixture(autouse=True)
def no_telemetry_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    without_telemetry_sdk(monkeypatch)


class CountingLedger(MemoryLedger):
    """A memory ledger subclassed to see its calls, as a user would to count, log or change them:
    for a synchronous ledger ``reserve_now`` and ``settle_now`` are the reserve and the settle."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reserved: list[str] = []
        self.settled: list[str] = []

    def reserve_now(self, reservation_id: str, holds: Any, lease_ms: int) -> Any:
        self.reserved.append(reservation_id)
        return super().reserve_now(reservation_id, holds, lease_ms)

    def settle_now(self, settlement: Settlement) -> Any:
        self.settled.append(settlement.reservation_id)
        return super().settle_now(settlement)


def one_rule(limit: str = "10", period: str | None = "1d") -> tuple[Rule, ...]:
    return (Rule("user", "header:x-user", limit, period),)


# =================================================================================================
# The exit paths: one app each
# =================================================================================================

START: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"t")]}
BODY: Message = {"type": "http.response.body", "body": b"ok"}


def handle(scope: Scope, receive: Receive) -> Any:
    return get_reservation(Request(scope, receive))


async def completed(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send(BODY)


async def completed_charged(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge("0.25")
    await send(START)
    await send(BODY)


async def streamed(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    for chunk in (b"a", b"b"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def streamed_charging_per_chunk(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    for chunk in (b"a", b"b", b"c"):
        handle(scope, receive).charge("0.1")
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def disconnected_mid_stream(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def disconnected_before_start(scope: Scope, receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def disconnected_then_dropped_sends(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI 2.3: after the disconnect, send does nothing; the app finishes its response anyway."""
    await send(START)
    while (await receive())["type"] != "http.disconnect":
        pass
    await send({"type": "http.response.body", "body": b"late", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def send_raises_oserror(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    await send({"type": "http.response.body", "body": b"b", "more_body": True})  # raises


async def error_before_start(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("boom")


async def error_after_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    raise RuntimeError("boom")


async def error_after_charge(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge("0.3")
    await send(START)
    raise RuntimeError("boom")


async def error_after_final_body(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send(BODY)
    raise RuntimeError("a background task failed")


async def cancelled_mid_stream(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    await anyio.sleep_forever()  # the driver cancels it


async def status_422(scope: Scope, receive: Receive, send: Send) -> None:
    await send({**START, "status": 422})
    await send(BODY)


async def status_500_charged(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge("0.4")
    await send({**START, "status": 500})
    await send(BODY)


async def pathsend(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)
    await send({"type": "http.response.pathsend", "path": "/dev/null"})


async def trailer_charge(scope: Scope, receive: Receive, send: Send) -> None:
    await send({**START, "trailers": True})
    await send({"type": "http.response.body", "body": b"a"})
    trailers = [(b"X-Budget-Charge", b"0.7"), (b"x-kept", b"1")]
    await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})


async def trailers_announced_never_sent(scope: Scope, receive: Receive, send: Send) -> None:
    await send({**START, "trailers": True})
    await send({"type": "http.response.body", "body": b"a"})


async def header_charge(scope: Scope, receive: Receive, send: Send) -> None:
    await send({**START, "headers": [(b"X-Budget-Charge", b"0.5"), (b"x-kept", b"1")]})
    await send(BODY)


async def bad_header_charge(scope: Scope, receive: Receive, send: Send) -> None:
    await send({**START, "headers": [(b"x-budget-charge", b"\xff\xfe-1" + b"9" * 10_000)]})
    await send(BODY)


async def charge_zero(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge(0)
    await send(START)
    await send(BODY)


async def charge_many(scope: Scope, receive: Receive, send: Send) -> None:
    for amount in ("0.1", "0.2", 1, "0.000001", "0.1"):
        handle(scope, receive).charge(amount)
    await send(START)
    await send(BODY)


async def charge_and_header(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge("0.1")
    await send({**START, "headers": [(b"x-budget-charge", b"0.2")]})
    await send(BODY)


async def overrun(scope: Scope, receive: Receive, send: Send) -> None:
    handle(scope, receive).charge(4)
    await send(START)
    await send(BODY)


async def returned_unfinished(scope: Scope, receive: Receive, send: Send) -> None:
    await send(START)


async def unknown_message_first(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.zerocopysend", "file": 3})
    await send(START)
    await send(BODY)


EXIT_PATHS = [
    completed,
    completed_charged,
    streamed,
    streamed_charging_per_chunk,
    disconnected_mid_stream,
    disconnected_before_start,
    disconnected_then_dropped_sends,
    send_raises_oserror,
    error_before_start,
    error_after_start,
    error_after_charge,
    error_after_final_body,
    cancelled_mid_stream,
    status_422,
    status_500_charged,
    pathsend,
    trailer_charge,
    trailers_announced_never_sent,
    header_charge,
    bad_header_charge,
    charge_zero,
    charge_many,
    charge_and_header,
    overrun,
    returned_unfinished,
    unknown_message_first,
]

# The two charge configurations: the defaults, and the other choice of every per-reason default.
CONFIGS: dict[str, dict[str, str]] = {
    "defaults": {},
    "other-charges": {
        "charge_on_error": "estimate",
        "charge_on_disconnect": "zero",
        "charge_on_cancel": "zero",
    },
}

# What each exit path settles as by issue 3's table (estimate 2): its reason, and its actual in
# micro-units under each of CONFIGS. What the app charged wins over every per-reason default.
EXPECTED: dict[str, tuple[str, dict[str, int]]] = {
    "completed": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
    "completed_charged": ("completed", {"defaults": 250_000, "other-charges": 250_000}),
    "streamed": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
    "streamed_charging_per_chunk": ("completed", {"defaults": 300_000, "other-charges": 300_000}),
    "disconnected_mid_stream": ("disconnected", {"defaults": 2_000_000, "other-charges": 0}),
    "disconnected_before_start": ("disconnected", {"defaults": 2_000_000, "other-charges": 0}),
    "disconnected_then_dropped_sends": ("disconnected", {"defaults": 2_000_000, "other-charges": 0}),
    "send_raises_oserror": ("disconnected", {"defaults": 2_000_000, "other-charges": 0}),
    "error_before_start": ("error", {"defaults": 0, "other-charges": 2_000_000}),
    "error_after_start": ("error", {"defaults": 0, "other-charges": 2_000_000}),
    "error_after_charge": ("error", {"defaults": 300_000, "other-charges": 300_000}),
    "error_after_final_body": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
    "cancelled_mid_stream": ("cancelled", {"defaults": 2_000_000, "other-charges": 0}),
    "status_422": ("completed", {"defaults": 0, "other-charges": 0}),
    "status_500_charged": ("completed", {"defaults": 400_000, "other-charges": 400_000}),
    "pathsend": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
    "trailer_charge": ("completed", {"defaults": 700_000, "other-charges": 700_000}),
    "trailers_announced_never_sent": ("error", {"defaults": 0, "other-charges": 2_000_000}),
    "header_charge": ("completed", {"defaults": 500_000, "other-charges": 500_000}),
    "bad_header_charge": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
    "charge_zero": ("completed", {"defaults": 0, "other-charges": 0}),
    "charge_many": ("completed", {"defaults": 1_400_001, "other-charges": 1_400_001}),
    "charge_and_header": ("completed", {"defaults": 300_000, "other-charges": 300_000}),
    "overrun": ("completed", {"defaults": 4_000_000, "other-charges": 4_000_000}),
    "returned_unfinished": ("error", {"defaults": 0, "other-charges": 2_000_000}),
    "unknown_message_first": ("completed", {"defaults": 2_000_000, "other-charges": 2_000_000}),
}

# What the middleware's call raised, where it did not return: whatever the app (or send) raised.
RAISES = {
    "send_raises_oserror": "OSError",
    "error_before_start": "RuntimeError",
    "error_after_start": "RuntimeError",
    "error_after_charge": "RuntimeError",
    "error_after_final_body": "RuntimeError",
    "cancelled_mid_stream": "cancelled",
}

# The apps that never send a response start (the server answers for them).
NO_START = {"disconnected_before_start", "error_before_start"}


async def drive(mw: Any, app: Any, headers: list[tuple[str, str]]) -> tuple[str, list[Message]]:
    """One request through ``mw`` as a server would: what the call raised and what was sent."""
    receive = ScriptedReceive()
    send = RecordingSend(fail_after=2 if app is send_raises_oserror else None)
    scope = http_scope(headers=headers)
    outcome: list[str] = []

    async def call() -> None:
        try:
            await mw(scope, receive, send)
            outcome.append("returned")
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        except Exception as exc:
            outcome.append(type(exc).__name__)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            if app in (disconnected_mid_stream, disconnected_then_dropped_sends):
                await send.wait_for("http.response.start")
                receive.disconnect()
            elif app is disconnected_before_start:
                await wait_until(lambda: receive.calls >= 2, what="the app to wait for the client")
                receive.disconnect()
            elif app is cancelled_mid_stream:
                await wait_until(lambda: len(send.messages) >= 2, what="the stream to start")
                tg.cancel_scope.cancel()
    return (outcome[0] if outcome else "cancelled"), send.messages


def ratelimit_headers(remaining: int, *, lifetime: bool = False) -> list[tuple[bytes, bytes]]:
    """The RateLimit headers of the ``user`` rule (limit 10) at NOW_MS, ``remaining`` left."""
    if lifetime:
        return [(b"ratelimit-policy", b'"user";q=10000000'), (b"ratelimit", b'"user";r=%d' % remaining)]
    return [
        (b"ratelimit-policy", b'"user";q=10000000;w=86400'),
        (b"ratelimit", b'"user";r=%d;t=%d' % (remaining, RESET_S)),
    ]


def assert_the_client_saw(
    messages: list[Message], app: Any, remaining: int, *, lifetime: bool = False
) -> None:
    """The response start (if the app sent one) ends with the RateLimit headers of what was left
    after this request's hold, and no message carries the internal charge header or trailer."""
    starts = [m for m in messages if m["type"] == "http.response.start"]
    if app.__name__ in NO_START:
        assert starts == []
    else:
        (start,) = starts
        assert list(start["headers"])[-2:] == ratelimit_headers(remaining, lifetime=lifetime)
    sent_headers = [k.lower() for m in messages for k, _ in m.get("headers", ())]
    assert b"x-budget-charge" not in sent_headers
    if app in (header_charge, trailer_charge):
        assert b"x-kept" in sent_headers


@dataclass
class Scenario:
    """Everything observable about three requests (alice, alice, bob) of one app."""

    runs: list[tuple[str, list[Message]]]
    usage: list[tuple[int, int, int]]  # (spent, held, live holds) of alice, then of bob
    ledger: CountingLedger
    finalizer: Finalizer
    log: SettlementLog | None


async def run_scenario(app: Any, *, hook: bool, rules: str = "one", **config: Any) -> Scenario:
    rule_set = one_rule(period=None) if rules == "lifetime" else one_rule()
    if rules == "second-skipped":  # two rules, only one applies: a one-hold request
        rule_set += (Rule("team", "header:x-team", "100", "1h"),)
    cfg = BudgetConfig(rules=rule_set, estimate=ESTIMATE, **config)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog() if hook else None
    finalizer = Finalizer(ledger, lease_ms=cfg.lease_ms, on_settled=log)
    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=finalizer)
    runs = [await drive(mw, app, [("x-user", user)]) for user in ("alice", "alice", "bob")]
    await settle_all(finalizer)
    usage = []
    for user in ("alice", "bob"):
        u = await ledger.usage(Budget("user", f"r:{user}", 0 if rules == "lifetime" else DAY_MS), LIMIT)
        usage.append((u.spent, u.held, u.holds))
    return Scenario(runs, usage, ledger, finalizer, log)


def assert_each_client_saw(facts: Scenario, app: Any, actual: int, *, lifetime: bool = False) -> None:
    """alice's second request sees what her first one spent; bob's budget is his own."""
    after_hold = LIMIT - ESTIMATE
    remaining = (after_hold, max(0, after_hold - actual), after_hold)
    for (_, messages), left in zip(facts.runs, remaining, strict=True):
        assert_the_client_saw(messages, app, left, lifetime=lifetime)


def assert_settled_once_each(facts: Scenario, reason: str, actual: int, period_ms: int = DAY_MS) -> None:
    """Three requests, three settlements, each applied, each of one hold; the budgets clean."""
    assert facts.finalizer.applied == 3
    assert facts.finalizer.outcomes == {"applied": 3}
    assert (facts.finalizer.in_flight, facts.finalizer.pending) == (0, 0)
    assert facts.usage == [(2 * actual, 0, 0), (actual, 0, 0)]
    # Every reserve and every settle went through the ledger's own calls, once per request.
    assert len(facts.ledger.reserved) == 3
    assert facts.ledger.settled == facts.ledger.reserved
    if facts.log is not None:
        assert [s.reservation_id for s, _ in facts.log.entries] == facts.ledger.reserved
        users = ("alice", "alice", "bob")
        for (settlement, settled), user in zip(facts.log.entries, users, strict=True):
            assert (settlement.reason, settlement.actual, settlement.estimate) == (
                reason,
                actual,
                ESTIMATE,
            )
            assert [h.budget for h in settlement.holds] == [Budget("user", f"r:{user}", period_ms)]
            assert settled.outcomes == ("applied",)


@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("hook", [False, True], ids=["no-hook", "on_settled"])
@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_every_exit_path_settles_once_with_its_reason_and_amount(
    app: Any, hook: bool, config: str
) -> None:
    facts = await run_scenario(app, hook=hook, **CONFIGS[config])
    reason, actuals = EXPECTED[app.__name__]
    actual = actuals[config]
    assert [raised for raised, _ in facts.runs] == [RAISES.get(app.__name__, "returned")] * 3
    assert_each_client_saw(facts, app, actual)
    assert_settled_once_each(facts, reason, actual)


@pytest.mark.parametrize("rules", ["lifetime", "second-skipped"])
@pytest.mark.parametrize(
    "app",
    [completed_charged, streamed, header_charge, disconnected_mid_stream, status_422],
    ids=lambda a: a.__name__,
)
async def test_lifetime_budgets_and_a_skipped_second_rule_settle_once_with_their_amount(
    app: Any, rules: str
) -> None:
    """A lifetime budget has no window and no reset; a second rule whose id is missing (skip)
    takes no hold and appears in no header."""
    facts = await run_scenario(app, hook=True, rules=rules)
    reason, actuals = EXPECTED[app.__name__]
    actual = actuals["defaults"]
    lifetime = rules == "lifetime"
    assert_each_client_saw(facts, app, actual, lifetime=lifetime)
    assert_settled_once_each(facts, reason, actual, period_ms=0 if lifetime else DAY_MS)
    assert facts.log is not None
    window = 0 if lifetime else NOW_MS - NOW_MS % DAY_MS
    for settlement, _ in facts.log.entries:
        (hold,) = settlement.holds
        assert (hold.window, hold.reset_ms) == (window, None if lifetime else window + DAY_MS)


async def test_a_rejected_request_is_answered_429_and_settles_nothing() -> None:
    """Limit 3 micro-units, estimate 2: the first request is admitted and spends 2; the second
    would go over the limit, gets a 429 that says when the window resets, and never reaches the
    app. Only the admitted request settles."""
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await completed(scope, receive, send)

    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog()
    cfg = BudgetConfig(rules=one_rule("0.000003"), estimate=2)
    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    admitted, rejected = RecordingSend(), RecordingSend()
    for send in (admitted, rejected):
        await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), send)
    await settle_all(mw.finalizer)
    policy = (b"ratelimit-policy", b'"user";q=3;w=86400')
    assert admitted.status == 200
    assert admitted.raw_headers[-2:] == [policy, (b"ratelimit", b'"user";r=1;t=%d' % RESET_S)]
    assert rejected.status == 429
    assert rejected.header("ratelimit-policy") == policy[1].decode()
    assert rejected.header("ratelimit") == f'"user";r=1;t={RESET_S}'
    assert rejected.header("retry-after") == str(RESET_S)  # spent alone blocks: wait for the reset
    (budget,) = rejected.json()["budgets"]
    assert (budget["remaining"], budget["retry_helps"]) == ("0.000001", False)
    assert calls == 1
    assert len(ledger.reserved) == 2
    assert log.reasons == ["completed"]
    assert ledger.settled == [s.reservation_id for s, _ in log.entries]
    usage = await ledger.usage(Budget("user", "r:alice", DAY_MS), 3)
    assert (usage.spent, usage.held, usage.holds) == (2, 0, 0)


async def test_a_memory_ledger_subclass_sees_every_reserve_and_settle() -> None:
    """A subclass of the memory ledger that overrides ``reserve_now`` and ``settle_now`` (to count,
    log or change them) gets every call: one-rule and two-rule requests, admitted or rejected."""
    rules = (Rule("user", "header:x-user", "3", "1d"), Rule("team", "header:x-team", "10", "1d"))
    ledger = CountingLedger()
    log = SettlementLog()
    cfg = BudgetConfig(rules=rules, estimate=ESTIMATE)
    mw = BudgetMiddleware(completed, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    statuses = []
    for headers in (
        [("x-user", "alice")],  # one rule: admitted, spends 2 of 3
        [("x-user", "alice"), ("x-team", "t")],  # two rules: alice has 1 left, rejected
        [("x-user", "bob"), ("x-team", "t")],  # two rules: admitted
    ):
        send = RecordingSend()
        await mw(http_scope(headers=headers), ScriptedReceive(), send)
        statuses.append(send.status)
    await settle_all(mw.finalizer)
    assert statuses == [200, 429, 200]
    assert len(ledger.reserved) == 3
    assert ledger.settled == [ledger.reserved[0], ledger.reserved[2]]
    assert ledger.settled == [s.reservation_id for s, _ in log.entries]
    assert [len(s.holds) for s, _ in log.entries] == [1, 2]


# =================================================================================================
# Telemetry: with an SDK installed, every span and metric of every exit path
# =================================================================================================


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer provider installed as an application would (the global), plus the modules' tracers
    set to it as the other telemetry tests do."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    sdk_tracer = provider.get_tracer("budget_middleware", "0.1.0")
    for module in (telemetry, reserving_module, finalizer_module):
        monkeypatch.setattr(module, "tracer", sdk_tracer)
    try:
        yield exporter
    finally:
        provider.shutdown()


@pytest.fixture
def meter_reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(metrics_state, "_METER_PROVIDER", provider)
    monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(provider.get_meter("t")))
    try:
        yield reader
    finally:
        provider.shutdown()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[Any, Any]]]:
    out: dict[str, list[tuple[Any, Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = sorted(
                    (tuple(sorted((p.attributes or {}).items())), getattr(p, "value", None))
                    for p in metric.data.data_points
                )
    return out


@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_with_a_tracer_provider_each_exit_path_has_its_reserve_and_settle_span(
    app: Any, spans: InMemorySpanExporter
) -> None:
    cfg = BudgetConfig(rules=one_rule(), estimate=ESTIMATE)
    mw = BudgetMiddleware(app, cfg, ledger=MemoryLedger(clock=lambda: NOW_MS))
    await drive(mw, app, [("x-user", "alice")])
    await settle_all(mw.finalizer)
    finished = spans.get_finished_spans()
    names = sorted(s.name for s in finished)
    assert names == ["budget.reserve", "budget.settle"]
    (settle,) = [s for s in finished if s.name == "budget.settle"]
    (reserve,) = [s for s in finished if s.name == "budget.reserve"]
    reason, actuals = EXPECTED[app.__name__]
    assert settle.attributes is not None
    assert (settle.attributes["budget.reason"], settle.attributes["budget.actual"]) == (
        reason,
        actuals["defaults"],
    )
    assert settle.attributes["budget.outcome"] == "applied"
    assert [link.context for link in settle.links] == [reserve.context]


@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_with_a_meter_provider_each_exit_path_is_counted(
    app: Any, meter_reader: InMemoryMetricReader
) -> None:
    cfg = BudgetConfig(rules=one_rule(), estimate=ESTIMATE)
    mw = BudgetMiddleware(app, cfg, ledger=MemoryLedger(clock=lambda: NOW_MS))
    for user in ("alice", "bob"):
        await drive(mw, app, [("x-user", user)])
    await settle_all(mw.finalizer)
    got = metric_points(meter_reader)
    reason, actuals = EXPECTED[app.__name__]
    actual = actuals["defaults"]
    assert got["budget.reservations"] == [((("budget.outcome", "admitted"),), 2)]
    assert got["budget.settlements"] == [((("budget.outcome", "applied"), ("budget.reason", reason)), 2)]
    assert got.get("budget.spend", []) == ([((("budget.rule", "user"),), 2 * actual)] if actual else [])


async def test_a_meter_provider_installed_mid_request_gets_that_requests_settlement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reserved while no meter provider is installed, settled once one is: the settlement and
    its spend are counted."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        monkeypatch.setattr(metrics_state, "_METER_PROVIDER", provider)
        monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(provider.get_meter("t")))
        handle(scope, receive).charge("0.5")
        await send(START)
        await send(BODY)

    cfg = BudgetConfig(rules=one_rule(), estimate=ESTIMATE)
    mw = BudgetMiddleware(app, cfg, ledger=MemoryLedger(clock=lambda: NOW_MS))
    try:
        await drive(mw, app, [("x-user", "alice")])
        got = metric_points(reader)
        assert got["budget.settlements"] == [
            ((("budget.outcome", "applied"), ("budget.reason", "completed")), 1)
        ]
        assert got["budget.spend"] == [((("budget.rule", "user"),), 500_000)]
    finally:
        provider.shutdown()


# =================================================================================================
# The Redis ledger: the same exit paths, settled once through the finalizer's worker
# =================================================================================================

REDIS_BACKENDS = [
    pytest.param("fakeredis", marks=pytest.mark.fakeredis, id="fakeredis"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
]


@pytest.mark.parametrize("backend", REDIS_BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "app",
    [completed_charged, streamed, disconnected_mid_stream, error_after_start, cancelled_mid_stream],
    ids=lambda a: a.__name__,
)
async def test_the_redis_ledger_settles_each_exit_path_once(app: Any, ledger: Any) -> None:
    log = SettlementLog()
    cfg = BudgetConfig(rules=one_rule(), estimate=ESTIMATE)
    finalizer = Finalizer(ledger, lease_ms=cfg.lease_ms, on_settled=log)
    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=finalizer)
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        await drive(mw, app, [("x-user", "alice")])
        await settle_all(finalizer)
        await wait_until(lambda: len(log) == 1, what="the settlement")
        tg.cancel_scope.cancel()
    reason, actuals = EXPECTED[app.__name__]
    actual = actuals["defaults"]
    assert [(s.reason, s.actual) for s, _ in log.entries] == [(reason, actual)]
    assert log.outcomes == ["applied"]
    usage = await ledger.usage(Budget("user", "r:alice", DAY_MS), LIMIT)
    assert (usage.spent, usage.held) == (actual, 0)


# =================================================================================================
# Long streams keep their holds by renewal
# =================================================================================================


class RenewalCounter(MemoryLedger):
    def __init__(self) -> None:
        super().__init__()
        self.renewed = 0
        self.reheld = 0

    async def extend(self, reservations: Any, lease_ms: int) -> Any:
        result = await super().extend(reservations, lease_ms)
        self.renewed += result.renewed
        self.reheld += result.reheld
        return result


@pytest.mark.parametrize(
    "finalizer_lease_ms", [None, 60_000], ids=["same-lease", "longer-finalizer-lease"]
)
async def test_a_stream_longer_than_several_leases_keeps_its_hold(
    finalizer_lease_ms: int | None,
) -> None:
    """Lease 150 ms; the stream lasts four leases and more (with the finalizer's own lease, until
    it renewed four times). The hold is never purged (no re-hold of an expired one), a request
    that fits only if it were gone is refused meanwhile, and the stream settles ``applied`` with
    what it charged. A finalizer with a longer lease renews once, to its own lease."""
    ledger = RenewalCounter()
    lease_ms = 150
    cfg = BudgetConfig(rules=one_rule("3"), estimate=ESTIMATE, lease_ms=lease_ms)
    may_finish = anyio.Event()

    async def long_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await may_finish.wait()
        handle(scope, receive).charge("1.5")
        await send({"type": "http.response.body", "body": b""})

    finalizer = (
        Finalizer(ledger, lease_ms=finalizer_lease_ms) if finalizer_lease_ms is not None else None
    )
    mw = BudgetMiddleware(long_stream, cfg, ledger=ledger, finalizer=finalizer)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(mw.finalizer.run)
            send = RecordingSend()
            started = time.monotonic()
            tg.start_soon(mw, http_scope(headers=[("x-user", "a")]), ScriptedReceive(), send)
            if finalizer_lease_ms is None:
                await wait_until(lambda: ledger.renewed >= 4, what="four renewals")
            else:
                await wait_until(lambda: ledger.renewed >= 1, what="a renewal")
            await wait_until(
                lambda: time.monotonic() > started + 4 * lease_ms / 1000, what="four leases"
            )
            usage = await ledger.usage(Budget("user", "r:a", DAY_MS), 10**7)  # purges expired
            assert (usage.held, usage.holds) == (ESTIMATE, 1)
            other = RecordingSend()
            await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), other)
            assert other.status == 429  # 2 held of 3: the hold is alive
            may_finish.set()
            await wait_until(lambda: mw.finalizer.applied == 1, what="the settlement")
            tg.cancel_scope.cancel()
    assert ledger.reheld == 0
    assert mw.finalizer.outcomes == {"applied": 1}
    usage = await ledger.usage(Budget("user", "r:a", DAY_MS), 10**7)
    assert (usage.spent, usage.held, usage.holds) == (1_500_000, 0, 0)


# =================================================================================================
# Concurrency: interleaved requests keep their own state
# =================================================================================================


async def test_interleaved_requests_each_settle_their_own_charge() -> None:
    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog()
    cfg = BudgetConfig(rules=one_rule("100"), estimate=ESTIMATE)
    gates = {n: anyio.Event() for n in range(20)}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        n = int(dict(scope["headers"])[b"x-n"])
        await send(START)
        await gates[n].wait()
        handle(scope, receive).charge(f"0.{n + 1:02d}")
        await send({"type": "http.response.body", "body": b"x", "more_body": n % 2 == 1})
        if n % 2:
            await send({"type": "http.response.body", "body": b""})

    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(20):
                scope = http_scope(headers=[("x-user", f"u{n % 3}"), ("x-n", str(n))])
                tg.start_soon(mw, scope, ScriptedReceive(), RecordingSend())
            await wait_until(lambda: mw.finalizer.in_flight == 20, what="twenty requests")
            for n in reversed(range(20)):
                gates[n].set()
    by_rid = {s.reservation_id: s.actual for s, _ in log.entries}
    assert len(by_rid) == 20
    assert sorted(by_rid.values()) == sorted((n + 1) * 10_000 for n in range(20))
    assert sorted(ledger.settled) == sorted(ledger.reserved) == sorted(by_rid)
    assert mw.finalizer.in_flight == 0
    for u in range(3):
        usage = await ledger.usage(Budget("user", f"r:u{u}", DAY_MS), 10**8)
        charged = sum((n + 1) * 10_000 for n in range(20) if n % 3 == u)
        assert (usage.spent, usage.held) == (charged, 0)


# =================================================================================================
# The handle is the response watcher: it must not tie the server's connection to the scope
# =================================================================================================


class Connection:
    """What a server keeps per request (uvicorn's ``RequestResponseCycle``): the scope, buffers,
    and the ``receive``/``send`` it hands the app as its own bound methods."""

    def __init__(self) -> None:
        self.scope = http_scope(headers=[("x-user", "a")])
        self.buffer = bytearray(1 << 20)

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        pass


@pytest.mark.parametrize("rules", [1, 2], ids=["one-rule", "two-rules"])
async def test_a_finished_request_leaves_no_reference_cycle_through_its_scope(rules: int) -> None:
    """The handle in ``scope["state"]["budget"]`` is also the response watcher, which holds the
    server's ``send``/``receive`` while the app runs. Were it to keep them after, scope -> state ->
    handle -> send -> connection -> scope would be a cycle, and every metered request's connection
    (its buffers, transport) would live on until the cyclic collector runs (under load, promoted
    past generation 0 by requests in flight, until a full collection); anything that keeps the
    handle (a log context, a background task, a traceback) would keep the server's callables too."""
    rule_set = one_rule()
    if rules == 2:
        rule_set += (Rule("everyone", "const:all", "100", "1d"),)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handle(scope, receive).charge("0.1")
        await send(START)
        await send(BODY)

    mw = BudgetMiddleware(app, BudgetConfig(rules=rule_set, estimate=ESTIMATE), ledger=MemoryLedger())
    connection = Connection()
    await mw(connection.scope, connection.receive, connection.send)
    assert connection.scope["state"]["budget"].charged == Decimal("0.1")
    gone = weakref.ref(connection)
    gc.disable()
    try:
        del connection
        assert gone() is None, "the finished request's connection is kept alive by a reference cycle"
    finally:
        gc.enable()
