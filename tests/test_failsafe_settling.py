"""What telemetry or a troubled store must never do to a settlement: found by a review of the
restructured core, each test failed before its fix.

- A span processor that raises after a reserve was admitted must not leak the hold (the reserve's
  telemetry ran before the middleware's settling ``try``), nor escape ``submit`` at the settle.
- Retries during an outage are not refusals: a settlement retried through a long outage and then
  refused once by the store is retried, not given up as lost.
- An outage met while a failed batch is retried one by one stops that pass at once, instead of
  waiting a timeout per settlement while renewals wait behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from starlette.types import Receive, Scope, Send

import budget_middleware.reserving as reserving_module
from asgi_helpers import RecordingSend, ScriptedReceive, http_scope, settle_all
from budget_middleware import BudgetConfig, BudgetMiddleware, MemoryLedger, Rule, telemetry
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.ledger import (
    HoldRequest,
    LedgerError,
    LedgerUnavailable,
    Reservation,
    Settled,
    Settlement,
    new_reservation_id,
)

pytestmark = pytest.mark.memory

BUDGET = Budget("user", "r:alice", 0)


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Exploding(SpanExporter):
    """An exporter whose every export raises: through SimpleSpanProcessor, at ``span.end()``."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise RuntimeError("the exporter broke")

    def shutdown(self) -> None:
        return None


class RaisingProcessor(SimpleSpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("the span processor broke")


async def test_a_span_processor_that_raises_leaks_no_hold_and_fails_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(RaisingProcessor(Exploding()))
    tracer = provider.get_tracer("budget_middleware")
    monkeypatch.setattr(telemetry, "tracer", tracer)
    monkeypatch.setattr(reserving_module, "tracer", tracer)
    ledger = MemoryLedger()
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", None),), estimate=1_000_000)
    mw = BudgetMiddleware(ok, config, ledger=ledger)
    sent = RecordingSend()
    await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), sent)
    await settle_all(mw.finalizer)
    assert sent.status == 200
    usage = await ledger.usage(BUDGET, 10_000_000)
    assert (usage.spent, usage.held, usage.holds) == (1_000_000, 0, 0)
    assert mw.finalizer.applied == 1
    provider.shutdown()


class TroubledLedger(MemoryLedger):
    """Settles go through the worker (no settle_now); the first ``outage`` batches fail as an
    outage, the next one fails as a non-outage error (so the batch is retried one by one) and each
    settlement is then refused ``refusals`` times before it is applied."""

    def __init__(self, *, outage: int, refusals: int = 0, outage_when_isolating: bool = False) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]
        self.outage = outage
        self.refusals = refusals
        self.outage_when_isolating = outage_when_isolating
        self.calls = 0
        self.isolated_calls = 0
        self.broke_batch = False

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        self.calls += 1
        if self.outage > 0:
            self.outage -= 1
            raise LedgerUnavailable("redis down")
        if not self.broke_batch and len(settlements) > 1:
            self.broke_batch = True
            raise RuntimeError("a script error in the batch")
        if self.broke_batch and len(settlements) == 1:
            self.isolated_calls += 1
            if self.outage_when_isolating:
                self.outage_when_isolating = False
                raise LedgerUnavailable("redis down again")
            if self.refusals > 0:
                self.refusals -= 1
                raise LedgerError("OOM command not allowed")
        return await super().settle_many(settlements)


def admitted(ledger: MemoryLedger, amount: int) -> Reservation:
    r = ledger.reserve_now(new_reservation_id(), [HoldRequest(BUDGET, 10**9, amount)], 60_000)
    assert isinstance(r, Reservation)
    return r


async def run_until_settled(finalizer: Finalizer, settlements: list[Settlement]) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        for s in settlements:
            finalizer.submit(s)
        assert await finalizer.wait_idle(10)
        await finalizer.drain(2)
        tg.cancel_scope.cancel()


async def test_a_refusal_after_a_long_outage_is_retried_not_given_up() -> None:
    ledger = TroubledLedger(outage=30, refusals=1)
    finalizer = Finalizer(ledger, retry_base_s=0.0005, retry_cap_s=0.001)
    settlements = []
    for amount in (3, 4):
        r = admitted(ledger, amount)
        settlements.append(Settlement(r.id, r.holds, amount, "completed", amount))
    await run_until_settled(finalizer, settlements)
    assert finalizer.lost == 0
    usage = await ledger.usage(BUDGET, 10**9)
    assert (usage.spent, usage.held) == (7, 0)


async def test_an_outage_while_isolating_a_failed_batch_stops_the_pass() -> None:
    ledger = TroubledLedger(outage=0, outage_when_isolating=True)
    finalizer = Finalizer(ledger, retry_base_s=0.0005, retry_cap_s=0.001)
    settlements = []
    for amount in range(1, 11):
        r = admitted(ledger, amount)
        settlements.append(Settlement(r.id, r.holds, amount, "completed", amount))
    await run_until_settled(finalizer, settlements)
    # One isolated call met the outage and the rest went back to the queue with it: before, each
    # of the other nine was tried alone in the same pass (ten isolated calls before any retry).
    assert finalizer.lost == 0
    usage = await ledger.usage(BUDGET, 10**9)
    assert (usage.spent, usage.held) == (55, 0)
    assert ledger.calls == 3  # the batch, one isolated settle that met the outage, the retry


async def test_recording_that_raises_never_escapes_submit(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("the meter broke")

    ledger = MemoryLedger()
    finalizer = Finalizer(ledger)
    monkeypatch.setattr(finalizer._recorder, "_traced", broken)
    r = admitted(ledger, 5)
    finalizer.submit(Settlement(r.id, r.holds, 5, "completed", 5))  # must not raise
    usage = await ledger.usage(BUDGET, 10**9)
    assert (usage.spent, usage.held) == (5, 0)
    assert finalizer.applied == 1


async def test_a_spill_still_being_written_when_the_process_is_abandoned_is_journaled(
    tmp_path: Any,
) -> None:
    """Settlements over the pending bound are written to the journal by a task of their own, in a
    worker thread. A shutdown cut short while that write runs must still keep them: before, the
    batch in flight was in neither the queue nor the spill buffer, so abandon() saw none of it."""
    import threading

    from budget_middleware.journal import Journal, read_unapplied

    release = threading.Event()
    spill_started = threading.Event()

    class SlowSpill(Journal):
        def write(self, settlements: Sequence[Settlement] = (), applied: Any = ()) -> None:
            if settlements and not spill_started.is_set():
                spill_started.set()
                release.wait(10)  # the disk stalls on this one write, which then never lands:
                return  # what a process that ends meanwhile leaves of it
            super().write(settlements, applied)

    ledger = TroubledLedger(outage=10**9)  # Redis down the whole time
    finalizer = Finalizer(
        ledger, journal=SlowSpill(tmp_path), max_pending=2, retry_base_s=0.01, retry_cap_s=0.02
    )
    handed = []
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        for amount in range(1, 5):  # two queued, two over the bound: spilled
            r = admitted(ledger, amount)
            s = Settlement(r.id, r.holds, amount, "completed", amount)
            handed.append(s.reservation_id)
            finalizer.submit(s)
        # The write runs in a worker thread: wait for it there, with a deadline.
        assert await anyio.to_thread.run_sync(spill_started.wait, 10)
        lost = finalizer.abandon("the process is ending")  # while the spill write is stalled
        release.set()
        tg.cancel_scope.cancel()
    journaled = {s.reservation_id for path in tmp_path.glob("*.jsonl") for s in read_unapplied(path)}
    assert (lost, finalizer.lost) == (0, 0)
    assert set(handed) <= journaled
