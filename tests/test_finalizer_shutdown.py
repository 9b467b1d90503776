"""Whatever the shutdown, every settlement handed over is applied, journaled, or counted as lost.

A forced exit (uvicorn's second Ctrl-C, or ``asyncio.run`` ending) cancels every task at once: the
lifespan's, the finalizer's worker and the requests'. The drain must still run (shielded, once,
to its end) and must not wait for a worker that is gone; settlements handed over after it are
journaled or counted. The real-server version is in ``test_servers.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from asgi_helpers import MessageQueue, RecordingSend, ScriptedReceive, http_scope, wait_until
from budget_middleware import BudgetConfig, BudgetMiddleware, Rule, to_micros
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.journal import Journal, read_unapplied
from budget_middleware.ledger import (
    HoldRequest,
    LedgerUnavailable,
    MemoryLedger,
    Reservation,
    Settled,
    Settlement,
    new_reservation_id,
)

LIMIT = "1000"
ESTIMATE = 3


class AsyncLedger(MemoryLedger):
    """The memory ledger settled by the finalizer's worker; settles fail while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]
        self.down = False

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        await anyio.lowlevel.checkpoint()
        if self.down:
            raise LedgerUnavailable("connection refused")
        return await super().settle_many(settlements)


async def test_a_drain_does_not_wait_for_a_worker_that_was_cancelled() -> None:
    """The worker is cancelled while the drain waits for a request; the request then hands its
    settlement over: the drain applies it itself instead of waiting its whole timeout."""
    ledger = AsyncLedger()
    budget = Budget("user", "r:alice", 0)
    reserved = await ledger.reserve(new_reservation_id(), [HoldRequest(budget, 100, 5)], 60_000)
    assert isinstance(reserved, Reservation)
    fin = Finalizer(ledger)
    worker = anyio.CancelScope()
    drained: list[int] = []

    async def run_worker() -> None:
        with worker:
            await fin.run()

    async def drain() -> None:
        drained.append(await fin.drain(60))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker)
        await wait_until(lambda: fin.running, what="the worker")
        fin.track(reserved)  # a request in flight
        tg.start_soon(drain)
        await anyio.lowlevel.checkpoint()
        worker.cancel()  # the event loop cancels every task, the worker among them
        await wait_until(lambda: not fin.running, what="the worker to end")
        fin.submit(Settlement(reserved.id, reserved.holds, 4, "cancelled", 5))
        with anyio.fail_after(10):  # well under the drain's 60 s
            await wait_until(lambda: bool(drained), timeout_s=10, what="the drain")
    assert drained == [0]
    assert fin.outcomes == {"applied": 1}
    usage = await ledger.usage(budget, 100)
    assert (usage.spent, usage.held) == (4, 0)


async def slow(request: Request) -> Response:
    await anyio.sleep_forever()
    return PlainTextResponse("never")  # pragma: no cover


def app_with(ledger: MemoryLedger, journal: Path | None) -> tuple[Starlette, list[BudgetMiddleware]]:
    config = BudgetConfig(
        rules=(Rule("user", "header:x-user", LIMIT, "none"),),
        estimate=to_micros(ESTIMATE),
        journal_dir=str(journal) if journal else None,
        drain_timeout_ms=2_000,
    )
    made: list[BudgetMiddleware] = []

    class Recorded(BudgetMiddleware):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    app = Starlette(
        routes=[Route("/slow", slow)], middleware=[Middleware(Recorded, config=config, ledger=ledger)]
    )
    return app, made


@pytest.mark.parametrize("ledger_down", [False, True], ids=["ledger-up", "ledger-down"])
async def test_every_task_cancelled_at_once_still_settles_or_journals_the_requests_in_flight(
    tmp_path: Path, ledger_down: bool
) -> None:
    """What ``asyncio.run`` does at a forced exit: the lifespan task and the requests' tasks are
    all cancelled at once. With the ledger up the spend is applied; with it down it is journaled,
    and a finalizer started on the journal applies it."""
    ledger = AsyncLedger()
    journal = tmp_path / "journal"
    app, made = app_with(ledger, journal)
    lifespan_in = MessageQueue()
    sent: list[Message] = []

    async def lifespan_send(message: Message) -> None:
        sent.append(message)

    lifespan = asyncio.ensure_future(app({"type": "lifespan"}, lifespan_in, lifespan_send))
    lifespan_in.push({"type": "lifespan.startup"})
    await wait_until(lambda: bool(sent), what="the startup")
    assert sent[0]["type"] == "lifespan.startup.complete"
    (mw,) = made
    requests = [
        asyncio.ensure_future(
            app(http_scope("/slow", headers=[("x-user", f"u{i}")]), ScriptedReceive(), RecordingSend())
        )
        for i in range(2)
    ]
    await wait_until(lambda: mw.finalizer.in_flight == 2, what="two requests in flight")
    ledger.down = ledger_down
    # As asyncio.run ends: every task but this one is cancelled, the finalizer's worker too.
    everything = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert {lifespan, *requests} < set(everything)  # and the finalizer's worker
    for task in everything:
        task.cancel()
    await asyncio.gather(*everything, return_exceptions=True)
    lifespan_in.close()

    budgets = [Budget("user", f"r:u{i}", 0) for i in range(2)]
    if ledger_down:
        files = sorted(journal.glob("journal-*.jsonl"))
        journaled = [s for path in files for s in read_unapplied(path)]
        assert sorted(s.actual for s in journaled) == [to_micros(ESTIMATE)] * 2
        ledger.down = False
        replay = Finalizer(ledger, journal=Journal(journal))
        async with anyio.create_task_group() as tg:
            await tg.start(replay.run)
            await wait_until(lambda: replay.applied == 2, what="the replay")
            assert await replay.drain(2) == 0
    for budget in budgets:
        usage = await ledger.usage(budget, to_micros(LIMIT))
        assert (usage.spent, usage.held) == (to_micros(ESTIMATE), 0), budget
    assert mw.finalizer.lost == 0
