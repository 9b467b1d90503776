"""The memory ledger's lean request path gives exactly what the general path gives.

On the memory ledger, a one-rule request while no tracer or meter provider is installed reserves
and settles its one hold without the ``HoldRequest``, ``Reservation``, ``Settlement`` and
``Settled`` objects, and without metric calls. Each scenario runs through two middlewares on
ledgers with the same fixed clock, one lean and one with the lean path switched off, and every
observable result is compared: the messages sent (RateLimit headers included), what the
``on_settled`` hook receives, the finalizer's counts and the budget afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_state
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.types import Receive, Scope, Send

from asgi_helpers import (
    CountingLedger,
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
    get_reservation,
    telemetry,
)
from budget_middleware.budgets import Budget
from budget_middleware.ledger import HoldRequest, Rejection, Reservation, Settlement, new_reservation_id

# A fixed ledger clock, so RateLimit's t= is the same in both runs; near the ids' own time, so no
# settle is refused as stale.
NOW_MS = time.time_ns() // 1_000_000


@pytest.fixture(autouse=True)
def no_telemetry_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    without_telemetry_sdk(monkeypatch)


async def charging(scope: Scope, receive: Receive, send: Send) -> None:
    from starlette.requests import Request

    get_reservation(Request(scope, receive)).charge("0.25")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def overrunning(scope: Scope, receive: Receive, send: Send) -> None:
    from starlette.requests import Request

    get_reservation(Request(scope, receive)).charge(7)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def header_charge(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"X-Budget-Charge", b"0.5"), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def uncharged(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    await send({"type": "http.response.body", "body": b"b"})


async def failing_status(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 422, "headers": []})
    await send({"type": "http.response.body", "body": b"no"})


async def raising(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("boom")


async def abandoned(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"a", "more_body": True})


APPS = [charging, overrunning, header_charge, uncharged, failing_status, raising, abandoned]


def test_a_subclass_that_overrides_only_the_general_calls_is_not_bypassed() -> None:
    """A memory ledger subclassed to count, log or change ``reserve_now``/``settle_now`` gets every
    call there: the lean path is for a class whose fast calls come with its general ones."""

    class Logging(MemoryLedger):
        def reserve_now(self, reservation_id: str, holds: Any, lease_ms: int) -> Any:
            return super().reserve_now(reservation_id, holds, lease_ms)

        def settle_now(self, settlement: Settlement) -> Any:
            return super().settle_now(settlement)

    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=2)
    mw = BudgetMiddleware(uncharged, config, ledger=Logging())
    assert mw._reserve_hold is None
    assert not mw.finalizer.settles_holds
    assert BudgetMiddleware(uncharged, config, ledger=MemoryLedger())._reserve_hold is not None


def harness(app: Any, *, lean: bool, limit: str = "10") -> tuple[BudgetMiddleware, SettlementLog]:
    config = BudgetConfig(rules=(Rule("user", "header:x-user", limit, "1d"),), estimate=2)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    log = SettlementLog()
    finalizer = Finalizer(ledger, lease_ms=config.lease_ms, on_settled=log)
    mw = BudgetMiddleware(app, config, ledger=ledger, finalizer=finalizer)
    assert mw._reserve_hold is not None
    if not lean:
        mw._reserve_hold = None  # the general path, as for any other ledger
    return mw, log


async def run(mw: BudgetMiddleware, user: str = "alice") -> tuple[RecordingSend, str]:
    send = RecordingSend()
    with pytest.raises(RuntimeError) if mw.app is raising else _nothing():
        await mw(http_scope(headers=[("x-user", user)]), ScriptedReceive(), send)
    return send, repr(send.messages)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def settlement_facts(log: SettlementLog) -> list[tuple[Any, ...]]:
    out = []
    for settlement, settled in log.entries:
        fields = {
            f.name: getattr(settlement, f.name)
            for f in dataclasses.fields(settlement)
            if f.name not in ("reservation_id", "context")
        }
        # Every field of every hold but its epoch, which each ledger draws at random.
        fields["holds"] = [dataclasses.replace(h, epoch="") for h in settlement.holds]
        out.append((fields, settled.outcomes, settled.outcome))
    return out


@pytest.mark.parametrize("app", APPS, ids=lambda a: a.__name__)
async def test_the_lean_path_answers_and_settles_as_the_general_path(app: Any) -> None:
    results = []
    for lean in (True, False):
        mw, log = harness(app, lean=lean)
        sent = [await run(mw), await run(mw, "bob"), await run(mw)]
        await settle_all(mw.finalizer)
        ledger = mw.ledger
        assert isinstance(ledger, CountingLedger)
        if lean:
            assert (ledger.general_reserves, ledger.general_settles) == (0, 0)
        else:
            assert ledger.general_reserves == ledger.general_settles == 3
        usage = await ledger.usage(Budget("user", "r:alice", 86_400_000), 10**7)
        results.append(
            (
                [messages for _, messages in sent],
                settlement_facts(log),
                mw.finalizer.applied,
                dict(mw.finalizer.outcomes),
                (usage.spent, usage.held, usage.holds),
            )
        )
    assert results[0] == results[1]


async def test_a_rejection_on_the_lean_path_is_the_general_one() -> None:
    results = []
    for lean in (True, False):
        mw, log = harness(uncharged, lean=lean, limit="0.000003")
        sent = [await run(mw), await run(mw)]  # the second would go over the limit
        await settle_all(mw.finalizer)
        results.append(([messages for _, messages in sent], settlement_facts(log)))
    assert results[0] == results[1]
    assert "429" in results[0][0][1]


async def test_without_a_hook_nothing_is_built_and_everything_is_counted() -> None:
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=2)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    mw = BudgetMiddleware(charging, config, ledger=ledger)
    for user in ("a", "b", "a"):
        await run(mw, user)
    assert (ledger.general_reserves, ledger.general_settles) == (0, 0)
    assert mw.finalizer.applied == 3
    assert mw.finalizer.outcomes == {"applied": 3}
    assert mw.finalizer.in_flight == 0
    usage = await ledger.usage(Budget("user", "r:a", 86_400_000), 10**7)
    assert (usage.spent, usage.held) == (500_000, 0)


async def test_several_rules_take_the_general_path() -> None:
    rules = (Rule("user", "header:x-user", "10", "1d"), Rule("team", "header:x-team", "10", "1d"))
    config = BudgetConfig(rules=rules, estimate=2)
    ledger = CountingLedger(clock=lambda: NOW_MS)
    mw = BudgetMiddleware(charging, config, ledger=ledger)
    scope = http_scope(headers=[("x-user", "a"), ("x-team", "t")])
    await mw(scope, ScriptedReceive(), RecordingSend())
    assert (ledger.general_reserves, ledger.general_settles) == (1, 1)


async def test_a_meter_provider_means_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(provider.get_meter("t")))
    assert telemetry.metrics_recorded()
    mw, _ = harness(charging, lean=True)
    await run(mw)
    ledger = mw.ledger
    assert isinstance(ledger, CountingLedger)
    assert (ledger.general_reserves, ledger.general_settles) == (1, 1)
    provider.shutdown()


def test_metrics_are_recorded_once_a_meter_provider_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = trace.ProxyTracer("t")
    assert not telemetry.metrics_recorded()
    assert telemetry.telemetry_off(proxy)
    monkeypatch.setattr(metrics_state, "_METER_PROVIDER", MeterProvider())  # what set_... does
    assert telemetry.metrics_recorded()
    assert not telemetry.telemetry_off(proxy)


def test_a_missing_private_name_means_metrics_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(metrics_state, "_METER_PROVIDER")
    assert telemetry.metrics_recorded()
    assert not telemetry.telemetry_off(trace.ProxyTracer("t"))


async def test_a_lean_hold_still_has_its_lease_renewed() -> None:
    """A request that outlives a third of its lease gets its hold renewed, although the lean path
    tracks it without a ``Reservation`` (one is built for the renewal)."""
    renewed = anyio.Event()

    class RenewalsSeen(MemoryLedger):
        async def extend(self, reservations: Any, lease_ms: int) -> Any:
            result = await super().extend(reservations, lease_ms)
            assert all(isinstance(r, Reservation) for r in reservations)
            if result.renewed:
                renewed.set()
            return result

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.fail_after(10):
            await renewed.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=2, lease_ms=150)
    ledger = RenewalsSeen()
    mw = BudgetMiddleware(slow, config, ledger=ledger)
    assert mw._reserve_hold is not None
    send = RecordingSend()
    await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), send)
    assert send.status == 200
    assert mw.finalizer.outcomes == {"applied": 1}


async def test_an_idle_worker_is_not_woken_by_each_request() -> None:
    """The idle worker sleeps at most a third of a lease, so a request admitted meanwhile, due for
    renewal a third of its lease later, does not need to wake it."""
    ledger = MemoryLedger()
    finalizer = Finalizer(ledger, lease_ms=60_000)
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        await wait_until(lambda: finalizer._wait_until >= 0, what="the worker to sleep")
        assert finalizer._wakeup is not None
        reservation = ledger.reserve_now(
            new_reservation_id(), [HoldRequest(Budget("u", "r:a", 0), 10, 1)], 60_000
        )
        assert isinstance(reservation, Reservation)
        finalizer.track(reservation)
        assert not finalizer._wakeup.is_set()
        tg.cancel_scope.cancel()


def test_reserve_hold_and_settle_hold_are_one_holds_reserve_and_settle() -> None:
    ledger = MemoryLedger(clock=lambda: NOW_MS)
    budget = Budget("user", "r:a", 86_400_000)
    rid = new_reservation_id()
    got = ledger.reserve_hold(rid, budget, 10, 4, 60_000)
    assert not isinstance(got, Rejection)
    window, epoch, limit, remaining, reset_ms, purged, expired, replay, now = got
    assert (limit, remaining, purged, expired, replay, now) == (10, 6, 0, (), False, NOW_MS)
    assert (window, reset_ms) == (budget.window_of(NOW_MS), budget.window_of(NOW_MS) + 86_400_000)
    rejected = ledger.reserve_hold(new_reservation_id(), budget, 10, 7, 60_000)
    assert isinstance(rejected, Rejection)
    assert ledger.settle_hold(rid, budget, window, epoch, 3) == "applied"
    assert ledger.settle_hold(rid, budget, window, epoch, 3) == "duplicate"
    with pytest.raises(ValueError, match="actual >= 0"):
        ledger.settle_hold(rid, budget, window, epoch, -1)
