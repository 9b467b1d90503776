"""The memory ledger's lean request path keeps the contract of the general one.

Every exit path of a request must settle exactly once, with the same reason and amount, whether the
lean path serves it (one rule, memory ledger, no tracer or meter provider) or the general one (a
hook, a span context, a meter, a tracer, several rules, Redis). The scenarios below run each exit
path of issue 3's table through both paths on ledgers with one fixed clock and compare everything a
client, a hook, an exporter or the ledger can see. Then: lease renewal and prompt drains with the
idle worker's new sleep, the caches the lean path added, and the RateLimit bytes.

Two more guard against defects once found here: a finished request must leave no reference cycle
through its scope (the handle is also the response watcher, which holds the server's callables),
and waiting for running requests must not spin the finalizer's worker.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from collections.abc import Iterator
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
import budget_middleware.handle as handle_module
import budget_middleware.middleware as middleware_module
import budget_middleware.responses as responses_module
from asgi_helpers import (
    CountingLedger,
    MessageQueue,
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
    RedisLedger,
    Rule,
    get_reservation,
    telemetry,
)
from budget_middleware.budgets import Budget
from budget_middleware.handle import charge_micros
from budget_middleware.responses import hold_headers, rate_limit_headers

# One ledger clock for both paths, so RateLimit's t= is the same; near the ids' own time, so no
# settle is refused as stale.
NOW_MS = time.time_ns() // 1_000_000
DAY_MS = 86_400_000
ESTIMATE = 2_000_000  # 2 units, in micro-units


@pytest.fixture(autouse=True)
def no_telemetry_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    without_telemetry_sdk(monkeypatch)


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

# What each exit path must settle as by issue 3's table (default config, estimate 2): reason, and
# actual in micro-units.
EXPECTED = {
    "completed": ("completed", 2_000_000),
    "completed_charged": ("completed", 250_000),
    "streamed": ("completed", 2_000_000),
    "streamed_charging_per_chunk": ("completed", 300_000),
    "disconnected_mid_stream": ("disconnected", 2_000_000),
    "disconnected_before_start": ("disconnected", 2_000_000),
    "disconnected_then_dropped_sends": ("disconnected", 2_000_000),
    "send_raises_oserror": ("disconnected", 2_000_000),
    "error_before_start": ("error", 0),
    "error_after_start": ("error", 0),
    "error_after_charge": ("error", 300_000),
    "error_after_final_body": ("completed", 2_000_000),
    "cancelled_mid_stream": ("cancelled", 2_000_000),
    "status_422": ("completed", 0),
    "status_500_charged": ("completed", 400_000),
    "pathsend": ("completed", 2_000_000),
    "trailer_charge": ("completed", 700_000),
    "trailers_announced_never_sent": ("error", 0),
    "header_charge": ("completed", 500_000),
    "bad_header_charge": ("completed", 2_000_000),
    "charge_zero": ("completed", 0),
    "charge_many": ("completed", 1_400_001),
    "charge_and_header": ("completed", 300_000),
    "overrun": ("completed", 4_000_000),
    "returned_unfinished": ("error", 0),
    "unknown_message_first": ("completed", 2_000_000),
}

CONFIGS = {
    "defaults": {},
    "other-charges": {
        "charge_on_error": "estimate",
        "charge_on_disconnect": "zero",
        "charge_on_cancel": "zero",
    },
}


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


def settlement_facts(log: SettlementLog) -> list[Any]:
    out = []
    for settlement, settled in log.entries:
        fields = {
            f.name: getattr(settlement, f.name)
            for f in dataclasses.fields(settlement)
            if f.name not in ("reservation_id", "context")
        }
        fields["holds"] = [dataclasses.replace(h, epoch="") for h in settlement.holds]
        out.append((fields, settled.outcomes))
    return out


async def run_scenario(
    app: Any, *, lean: bool, hook: bool, rules: str = "one", **config: Any
) -> dict[str, Any]:
    """Three requests (alice, alice, bob) of ``app``; everything observable about them."""
    rule_set: tuple[Rule, ...] = (Rule("user", "header:x-user", "10", "1d"),)
    if rules == "lifetime":
        rule_set = (Rule("user", "header:x-user", "10", None),)
    elif rules == "second-skipped":  # two rules, only one applies: still a one-hold request
        rule_set += (Rule("team", "header:x-team", "100", "1h"),)
    cfg = BudgetConfig(rules=rule_set, estimate=ESTIMATE, **config)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog() if hook else None
    finalizer = Finalizer(ledger, lease_ms=cfg.lease_ms, on_settled=log)
    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=finalizer)
    assert mw._reserve_hold is not None
    if not lean:
        mw._reserve_hold = None  # the general path, as for any other ledger
    runs = []
    for user in ("alice", "alice", "bob"):
        raised, messages = await drive(mw, app, [("x-user", user)])
        runs.append((raised, repr(messages)))
    await settle_all(finalizer)
    usage = []
    for user in ("alice", "bob"):
        period = 0 if rules == "lifetime" else DAY_MS
        u = await ledger.usage(Budget("user", f"r:{user}", period), 10**7)
        usage.append((u.spent, u.held, u.holds))
    if lean:
        assert ledger.general == 0, "the lean path was not taken"
    else:
        assert ledger.general == 6
    return {
        "runs": runs,
        "usage": usage,
        "applied": finalizer.applied,
        "outcomes": dict(finalizer.outcomes),
        "in_flight": finalizer.in_flight,
        "pending": finalizer.pending,
        "settlements": settlement_facts(log) if log is not None else None,
    }


@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("hook", [False, True], ids=["no-hook", "on_settled"])
@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_every_exit_path_settles_once_alike_on_the_lean_and_the_general_path(
    app: Any, hook: bool, config: str
) -> None:
    lean = await run_scenario(app, lean=True, hook=hook, **CONFIGS[config])
    general = await run_scenario(app, lean=False, hook=hook, **CONFIGS[config])
    assert lean == general
    assert lean["applied"] == 3
    assert lean["outcomes"] == {"applied": 3}
    assert (lean["in_flight"], lean["pending"]) == (0, 0)
    assert all(held == 0 for _, held, _ in lean["usage"])


@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_every_exit_path_settles_the_reason_and_amount_of_issue_3(app: Any) -> None:
    facts = await run_scenario(app, lean=True, hook=True)
    reason, actual = EXPECTED[app.__name__]
    assert [(f["reason"], f["actual"]) for f, _ in facts["settlements"]] == [(reason, actual)] * 3
    alice_spent = facts["usage"][0][0]
    assert alice_spent == 2 * actual


@pytest.mark.parametrize("rules", ["lifetime", "second-skipped"])
@pytest.mark.parametrize(
    "app",
    [completed_charged, streamed, header_charge, disconnected_mid_stream, status_422],
    ids=lambda a: a.__name__,
)
async def test_lifetime_budgets_and_a_skipped_second_rule_answer_alike_on_both_paths(
    app: Any, rules: str
) -> None:
    lean = await run_scenario(app, lean=True, hook=True, rules=rules)
    general = await run_scenario(app, lean=False, hook=True, rules=rules)
    assert lean == general


# =================================================================================================
# Telemetry: with an SDK, the general path, with every span and metric
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
    for module in (telemetry, middleware_module, finalizer_module):
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
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    mw = BudgetMiddleware(app, cfg, ledger=ledger)
    await drive(mw, app, [("x-user", "alice")])
    await settle_all(mw.finalizer)
    assert ledger.general == 2  # the general path: a tracer provider is installed
    finished = spans.get_finished_spans()
    names = sorted(s.name for s in finished)
    assert names == ["budget.reserve", "budget.settle"]
    (settle,) = [s for s in finished if s.name == "budget.settle"]
    (reserve,) = [s for s in finished if s.name == "budget.reserve"]
    reason, actual = EXPECTED[app.__name__]
    assert settle.attributes is not None
    assert (settle.attributes["budget.reason"], settle.attributes["budget.actual"]) == (reason, actual)
    assert settle.attributes["budget.outcome"] == "applied"
    assert [link.context for link in settle.links] == [reserve.context]


@pytest.mark.parametrize("app", EXIT_PATHS, ids=lambda a: a.__name__)
async def test_with_a_meter_provider_each_exit_path_is_counted_as_before(
    app: Any, meter_reader: InMemoryMetricReader
) -> None:
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    mw = BudgetMiddleware(app, cfg, ledger=ledger)
    for user in ("alice", "bob"):
        await drive(mw, app, [("x-user", user)])
    await settle_all(mw.finalizer)
    assert ledger.general == 4  # the general path: a meter provider is installed
    got = metric_points(meter_reader)
    reason, actual = EXPECTED[app.__name__]
    assert got["budget.reservations"] == [((("budget.outcome", "admitted"),), 2)]
    assert got["budget.settlements"] == [((("budget.outcome", "applied"), ("budget.reason", reason)), 2)]
    assert got.get("budget.spend", []) == ([((("budget.rule", "user"),), 2 * actual)] if actual else [])


async def test_a_meter_provider_installed_mid_request_gets_that_requests_settlement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reserved on the lean path (no provider yet), settled once one is installed: the settlement
    is counted, as the general path's would be."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        monkeypatch.setattr(metrics_state, "_METER_PROVIDER", provider)
        monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(provider.get_meter("t")))
        handle(scope, receive).charge("0.5")
        await send(START)
        await send(BODY)

    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    mw = BudgetMiddleware(app, cfg, ledger=ledger)
    try:
        await drive(mw, app, [("x-user", "alice")])
        assert ledger.general == 0  # reserved and settled on the lean path
        got = metric_points(reader)
        assert got["budget.settlements"] == [
            ((("budget.outcome", "applied"), ("budget.reason", "completed")), 1)
        ]
        assert got["budget.spend"] == [((("budget.rule", "user"),), 500_000)]
    finally:
        provider.shutdown()


async def test_a_propagated_trace_reaches_the_hook_on_the_lean_path() -> None:
    """API-only instrumentation: no SDK, but an upstream trace is current; the hook's settlement
    carries its trace id on the lean path as on the general one."""
    ctx = trace.SpanContext(
        trace_id=0x1234, span_id=0x99, is_remote=True, trace_flags=trace.TraceFlags(1)
    )
    results = []
    for lean in (True, False):
        cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
        ledger = CountingLedger(clock=lambda: NOW_MS)
        log = SettlementLog()
        mw = BudgetMiddleware(
            completed_charged, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log)
        )
        if not lean:
            mw._reserve_hold = None
        with trace.use_span(trace.NonRecordingSpan(ctx)):
            await drive(mw, completed_charged, [("x-user", "alice")])
        (settlement, _) = log.only()
        results.append((settlement.trace_id, settlement.context))
        assert ledger.general == (0 if lean else 2)
    assert results[0] == results[1] == (format(0x1234, "032x"), ctx)


# =================================================================================================
# Backends and configurations that must not take the lean path
# =================================================================================================


@pytest.mark.parametrize(
    "app",
    [completed_charged, streamed, disconnected_mid_stream, error_after_start, cancelled_mid_stream],
    ids=lambda a: a.__name__,
)
async def test_the_redis_ledger_never_takes_the_lean_path_and_settles_once(app: Any) -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    ledger = RedisLedger(client=client)
    log = SettlementLog()
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
    finalizer = Finalizer(ledger, lease_ms=cfg.lease_ms, on_settled=log)
    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=finalizer)
    assert mw._reserve_hold is None
    assert not finalizer.settles_holds
    lean_calls: list[Any] = []
    original = finalizer.settle_hold

    def settle_hold_spy(*args: Any, **kwargs: Any) -> None:
        lean_calls.append(args)
        original(*args, **kwargs)

    finalizer.settle_hold = settle_hold_spy  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(finalizer.run)
            await drive(mw, app, [("x-user", "alice")])
            await settle_all(finalizer)
            await wait_until(lambda: len(log) == 1, what="the settlement")
            tg.cancel_scope.cancel()
        reason, actual = EXPECTED[app.__name__]
        assert [(s.reason, s.actual) for s, _ in log.entries] == [(reason, actual)]
        assert lean_calls == []
        usage = await ledger.usage(Budget("user", "r:alice", DAY_MS), 10**7)
        assert (usage.spent, usage.held) == (actual, 0)
    finally:
        await ledger.aclose()
        await client.aclose()


async def test_a_memory_ledger_that_settles_through_the_worker_is_not_lean() -> None:
    """A ledger without ``settle_now`` (as the outage tests make one) goes through the queue."""
    ledger = CountingLedger(clock=lambda: NOW_MS)
    ledger.settle_now = None  # type: ignore[assignment]
    mw = BudgetMiddleware(
        completed, BudgetConfig(rules=(Rule("u", "header:x-user", "10"),)), ledger=ledger
    )
    assert mw._reserve_hold is None


# =================================================================================================
# The finalizer: renewals of long lean streams, prompt drains with the idle worker's capped sleep
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
async def test_a_lean_stream_longer_than_several_leases_keeps_its_hold(
    finalizer_lease_ms: int | None,
) -> None:
    """Lease 150 ms; the stream lasts four leases and more (with the finalizer's own lease, until
    it renewed four times). The hold is never purged (no re-hold of an expired one), a request
    that fits only if it were gone is refused meanwhile, and the stream settles ``applied`` with
    what it charged. A finalizer with a longer lease renews once, to its own lease."""
    ledger = RenewalCounter()
    lease_ms = 150
    cfg = BudgetConfig(
        rules=(Rule("user", "header:x-user", "3", "1d"),), estimate=ESTIMATE, lease_ms=lease_ms
    )
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
    assert mw._reserve_hold is not None
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(mw.finalizer.run)
            # Let the idle worker fall asleep first, so the request is admitted while it sleeps.
            await wait_until(lambda: mw.finalizer._wait_until >= 0, what="the worker to idle")
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


async def lifespan(mw: Any, receive: MessageQueue, sent: RecordingSend) -> None:
    await mw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, sent)


async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(START)
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def test_shutdown_drains_at_once_although_the_idle_worker_sleeps_a_third_of_a_long_lease() -> None:
    """A 10 minute lease: the idle worker sleeps up to 200 s. A stream in flight at shutdown ends
    while the drain waits for it; the drain settles it and returns long before the worker would
    wake by itself (the deadline is far below 200 s)."""
    ledger = MemoryLedger()
    cfg = BudgetConfig(
        rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE, lease_ms=600_000
    )
    mw = BudgetMiddleware(lifespan_app, cfg, ledger=ledger)
    delivered: list[str] = []
    receive = MessageQueue(on_deliver=lambda m: delivered.append(m["type"]))
    sent = RecordingSend()
    try:
        await _run_lifespan_with_a_stream(mw, receive, sent, delivered)
    finally:
        receive.close()
    assert mw.finalizer.applied == 1
    assert mw.finalizer.outcomes == {"applied": 1}
    assert not mw.finalizer.running
    usage = await ledger.usage(Budget("user", "r:a", DAY_MS), 10**7)
    assert (usage.spent, usage.held) == (ESTIMATE, 0)


async def _run_lifespan_with_a_stream(
    mw: Any, receive: MessageQueue, sent: RecordingSend, delivered: list[str]
) -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan, mw, receive, sent)
            receive.push({"type": "lifespan.startup"})
            await sent.wait_for("lifespan.startup.complete")
            await wait_until(lambda: mw.finalizer._wait_until >= 0, what="the worker to idle")
            client = ScriptedReceive()
            stream = RecordingSend()
            tg.start_soon(mw, http_scope(headers=[("x-user", "a")]), client, stream)
            await stream.wait_for("http.response.body")
            assert mw.finalizer.in_flight == 1
            receive.push({"type": "lifespan.shutdown"})
            # The drain waits for the request; the client leaves, the request settles.
            await wait_until(lambda: "lifespan.shutdown" in delivered, what="the drain to start")
            assert mw.finalizer.in_flight == 1
            client.disconnect()
            await sent.wait_for("lifespan.shutdown.complete")


async def test_a_request_after_the_worker_idled_is_renewed_when_its_lease_is_shorter() -> None:
    """The worker (lease 60 s) idles up to 20 s; a request with a 150 ms lease must wake it."""
    ledger = RenewalCounter()
    finalizer = Finalizer(ledger, lease_ms=60_000)
    cfg = BudgetConfig(
        rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE, lease_ms=150
    )
    renewed = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await wait_until(lambda: ledger.renewed >= 1, what="a renewal")
        renewed.set()
        await send(START)
        await send(BODY)

    mw = BudgetMiddleware(app, cfg, ledger=ledger, finalizer=finalizer)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(finalizer.run)
            await wait_until(lambda: finalizer._wait_until >= 0, what="the worker to idle")
            await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), RecordingSend())
            tg.cancel_scope.cancel()
    assert renewed.is_set()
    assert finalizer.outcomes == {"applied": 1}


# =================================================================================================
# Caches: bounded, pure, safe with hostile input
# =================================================================================================


def test_the_charge_cache_is_bounded_and_gives_each_string_its_own_value() -> None:
    for n in range(5_000):
        text = f"{n}.{n % 997:03d}"
        assert charge_micros(text, "charge") == n * 1_000_000 + (n % 997) * 1_000
        assert len(handle_module._plain) <= handle_module._PLAIN_CACHE
    # A string cached before a clear and after it is worth the same.
    assert charge_micros("0.25", "charge") == 250_000
    handle_module._plain.clear()
    assert charge_micros("0.25", "charge") == 250_000


@pytest.mark.parametrize(
    "text",
    ["1" * 10_000, "\xff\xfe", "0.1234567", "-1", "NaN", "1e3", "١٢", "1_000", " 1", "1.", ".5", ""],
)
def test_the_charge_cache_keeps_no_string_that_is_not_plain(text: str) -> None:
    handle_module._plain.clear()
    try:
        charge_micros(text, "charge")
    except ValueError:
        pass
    assert text not in handle_module._plain


async def test_hostile_ids_answer_alike_on_both_paths_and_stay_out_of_the_budget_cache() -> None:
    headers: list[list[tuple[bytes, bytes]]] = [
        [(b"x-user", b"a" * 10_000)],
        [(b"x-user", b"\xff\xfe\x80")],
        [(b"x-user", b"\xff\xfe\x80"), (b"x-user", b"\xff\xfe\x80")],
        [(b"x-user", b"a"), (b"x-user", b"b")],
        [(b"X-User", b"a")],
        [(b"x-user", b"  ")],
        [(b"x-user", b"a" * 129)],
    ]
    results = []
    for lean in (True, False):
        cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d", on_missing="reject"),))
        ledger = CountingLedger(clock=lambda: NOW_MS)
        log = SettlementLog()
        mw = BudgetMiddleware(
            completed_charged, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log)
        )
        if not lean:
            mw._reserve_hold = None
        sent = []
        for _ in range(2):
            for h in headers:
                send = RecordingSend()
                await mw(http_scope(headers=h), ScriptedReceive(), send)
                sent.append(repr(send.messages))
        cache = mw._budgets[0]
        assert all(key is None or len(key) <= 128 for key in cache)
        results.append((sent, [(s.reason, s.actual, s.holds[0].budget) for s, _ in log.entries]))
    assert results[0] == results[1]


async def test_the_budget_cache_is_bounded_on_the_one_header_path() -> None:
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=0)
    mw = BudgetMiddleware(completed, cfg, ledger=MemoryLedger())
    assert mw._one_header is not None
    for n in range(middleware_module._BUDGET_CACHE + 10):
        await mw(http_scope(headers=[("x-user", f"u{n}")]), ScriptedReceive(), RecordingSend())
        assert len(mw._budgets[0]) <= middleware_module._BUDGET_CACHE


async def test_a_cached_budget_is_never_used_for_another_id() -> None:
    """The one-header shortcut: each id gets its own budget, whatever was cached before."""
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=1)
    log = SettlementLog()
    ledger = MemoryLedger()
    mw = BudgetMiddleware(completed, cfg, ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    for user in ("a", "b", "a", "A", "b "):
        await mw(http_scope(headers=[("x-user", user)]), ScriptedReceive(), RecordingSend())
    entities = [s.holds[0].budget.entity for s, _ in log.entries]
    assert entities[0] == entities[2] != entities[1] == entities[4]
    assert entities[3] not in (entities[0], entities[1])


def test_the_ratelimit_policy_cache_is_bounded() -> None:
    for n in range(3_000):
        hold_headers("user", n, DAY_MS, n, None, 0)
        assert len(responses_module._single_policy_cache) <= 1024


RATELIMIT_CASES = [
    ("user", 10_000_000, DAY_MS, 8_000_000, NOW_MS + 5_000, NOW_MS),
    ("user", 10_000_000, DAY_MS, -5, NOW_MS + 1, NOW_MS),  # remaining below zero: 0
    ("user", 10_000_000, DAY_MS, 0, NOW_MS, NOW_MS),  # at the reset: t=0
    ("user", 10_000_000, DAY_MS, 0, NOW_MS - 10, NOW_MS),  # past it: t=0
    ("user", 10_000_000, DAY_MS, 3, NOW_MS + 1_001, NOW_MS),  # rounded up: t=2
    ("life", 5, 0, 5, None, NOW_MS),  # lifetime: no t=
    ("équipe-%d", 10**15, 3_600_000, 10**15 - 1, NOW_MS + 3_600_000, NOW_MS),  # not ASCII, a %
]


@pytest.mark.parametrize("case", RATELIMIT_CASES, ids=lambda c: f"{c[0]}-{c[3]}")
def test_the_cached_ratelimit_bytes_are_those_of_the_general_formatter(case: Any) -> None:
    rule, limit, period_ms, remaining, reset_ms, now_ms = case
    expected = rate_limit_headers([(rule, limit, remaining, period_ms, reset_ms, now_ms)])
    responses_module._single_policy_cache.clear()
    assert hold_headers(rule, limit, period_ms, remaining, reset_ms, now_ms) == expected  # miss
    assert hold_headers(rule, limit, period_ms, remaining, reset_ms, now_ms) == expected  # hit


# =================================================================================================
# Concurrency: requests interleaved on the lean path keep their own state
# =================================================================================================


async def test_interleaved_lean_requests_each_settle_their_own_charge() -> None:
    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog()
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "100", "1d"),), estimate=ESTIMATE)
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
    assert ledger.general == 0
    by_rid = {s.reservation_id: s.actual for s, _ in log.entries}
    assert len(by_rid) == 20
    assert sorted(by_rid.values()) == sorted((n + 1) * 10_000 for n in range(20))
    assert mw.finalizer.in_flight == 0


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


@pytest.mark.parametrize("rules", [1, 2], ids=["one-rule-lean", "two-rules-general"])
async def test_a_finished_request_leaves_no_reference_cycle_through_its_scope(rules: int) -> None:
    """The handle in ``scope["state"]["budget"]`` is also the response watcher, which holds the
    server's ``send``/``receive`` while the app runs. Were it to keep them after, scope -> state ->
    handle -> send -> connection -> scope would be a cycle, and every metered request's connection
    (its buffers, transport) would live on until the cyclic collector runs (under load, promoted
    past generation 0 by requests in flight, until a full collection); anything that keeps the
    handle (a log context, a background task, a traceback) would keep the server's callables too."""
    rule_set: tuple[Rule, ...] = (Rule("user", "header:x-user", "10", "1d"),)
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


# =================================================================================================
# Waiting for running requests must not spin the worker
# =================================================================================================


async def test_waiting_for_running_requests_does_not_spin_the_worker() -> None:
    """``wait_idle(requests=True)`` (what ``drain`` does first, for up to BUDGET_DRAIN_TIMEOUT)
    sets the worker's wakeup on every pass; the worker loops, notifies, and the waiter sets the
    wakeup again: with one request in flight and nothing due for 20 s, the two tasks hand control
    back and forth without pause (about 10 000 passes and a full core in 0.5 s here). A waiter for
    requests needs no worker pass: it needs a notification when ``_inflight`` shrinks."""
    ledger = MemoryLedger()
    cfg = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=ESTIMATE)
    gate = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await gate.wait()
        await send({"type": "http.response.body", "body": b""})

    mw = BudgetMiddleware(app, cfg, ledger=ledger)
    finalizer = mw.finalizer
    passes = 0
    renew_due = finalizer._renew_due

    async def counting_renew_due() -> None:
        nonlocal passes
        passes += 1
        await renew_due()

    finalizer._renew_due = counting_renew_due  # type: ignore[method-assign]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(finalizer.run)
            send = RecordingSend()
            tg.start_soon(mw, http_scope(headers=[("x-user", "a")]), ScriptedReceive(), send)
            await send.wait_for("http.response.start")
            before = passes
            assert not await finalizer.wait_idle(0.3, requests=True)  # the request still runs
            spun = passes - before
            gate.set()
            assert await finalizer.wait_idle(5, requests=True)
            tg.cancel_scope.cancel()
    assert spun < 50, f"the worker looped {spun} times while one request ran"
