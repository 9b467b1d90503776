"""Releases (zero settlements of reserves whose reply never came) never crowd real settlements out.

During an outage every refused request queues a release; the queue is bounded (``max_pending``). A
release only gives a hold back early (the hold expires by its lease anyway), while a real settlement
carries spend: when the queue is full, a queued release is dropped before any real settlement is,
counted in ``releases_dropped`` and logged once in a while, never once per release.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Receive, Scope, Send

from asgi_helpers import RecordingSend, ScriptedReceive, http_scope, wait_until
from budget_middleware import BudgetConfig, BudgetMiddleware, Rule, to_micros
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    LedgerNotSent,
    LedgerUnavailable,
    MemoryLedger,
    Rejection,
    Reservation,
    Settled,
    Settlement,
    new_reservation_id,
)

LIMIT = "1000"


class OutageLedger(MemoryLedger):
    """The memory ledger, settled by the worker, whose reserves and settles fail while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]  # settled by the worker
        self.down = False

    def reserve_now(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection:
        if self.down:
            raise LedgerUnavailable("connection refused")
        return super().reserve_now(reservation_id, holds, lease_ms)

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        await anyio.lowlevel.checkpoint()
        if self.down:
            raise LedgerUnavailable("connection refused")
        return await super().settle_many(settlements)


@pytest.mark.parametrize("settled", ["before", "after"], ids=["settled-first", "settled-last"])
async def test_releases_of_refused_requests_never_push_out_a_real_settlement(
    settled: str, caplog: pytest.LogCaptureFixture
) -> None:
    """max_pending=50; one request admitted before the outage, 200 refused during it (each queues a
    release); the admitted request's settlement, handed over before or after them, is applied
    when the ledger returns."""
    ledger = OutageLedger()
    finalizer = Finalizer(ledger, max_pending=50, retry_base_s=0.002, retry_cap_s=0.01)
    go_on = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await go_on.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = BudgetConfig(rules=(Rule("user", "header:x-user", LIMIT, "none"),), estimate=to_micros(2))
    mw = BudgetMiddleware(app, config, ledger=ledger, finalizer=finalizer)
    user = [("x-user", "alice")]
    admitted = RecordingSend()
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        tg.start_soon(mw, http_scope("/slow", headers=user), ScriptedReceive(), admitted)
        await wait_until(lambda: finalizer.in_flight == 1, what="the admitted request")
        ledger.down = True
        if settled == "before":
            go_on.set()
            await admitted.wait_for("http.response.body")
        with caplog.at_level(logging.WARNING, logger="budget_middleware"):
            for _ in range(200):
                refused = RecordingSend()
                await mw(http_scope("/", headers=user), ScriptedReceive(), refused)
                assert refused.status == 503
            if settled == "after":
                go_on.set()
                await admitted.wait_for("http.response.body")
        assert finalizer.pending <= 50
        assert finalizer.lost == 0
        assert finalizer.releases_dropped >= 150
        drops = [
            r for r in caplog.records if "release" in r.getMessage() and "dropped" in r.getMessage()
        ]
        assert len(drops) <= 2, [r.getMessage() for r in drops]

        ledger.down = False
        assert await finalizer.wait_idle(5)
        assert await finalizer.drain(1) == 0
        tg.cancel_scope.cancel()
    assert admitted.status == 200
    usage = await ledger.usage(Budget("user", "r:alice", 0), to_micros(LIMIT))
    assert (usage.spent, usage.held, usage.holds) == (to_micros(2), 0, 0)
    assert finalizer.lost == 0


async def test_a_release_of_a_reserve_that_never_reached_the_store_is_not_queued() -> None:
    ledger = OutageLedger()
    ledger.down = True
    finalizer = Finalizer(ledger)
    hold = HeldBudget(Budget("user", "r:alice", 0), 5, -1, "", 100, 0, None)
    finalizer.submit(
        Settlement(new_reservation_id(), (hold,), 0, "release-unavailable", 5, never_sent=True)
    )
    assert finalizer.pending == 0
    finalizer.submit(Settlement(new_reservation_id(), (hold,), 0, "release-unavailable", 5))
    assert finalizer.pending == 1
    assert issubclass(LedgerNotSent, LedgerUnavailable)
    assert await finalizer.drain(0.1) == 0  # a release left at shutdown is no spend lost
    assert finalizer.releases_dropped == 1


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_redis_that_refuses_the_connection_queues_no_release() -> None:
    """A reserve refused at connect time never ran on the server: the Redis ledger says so
    (LedgerNotSent), and the middleware queues no release for it, however many requests come."""
    import socket

    from budget_middleware import RedisLedger
    from budget_middleware.ledger import LedgerNotSent

    with socket.socket() as held:  # bound and never listening: every connect is refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        ledger = RedisLedger(f"redis://127.0.0.1:{port}/0")
        try:
            with pytest.raises(LedgerNotSent):
                await ledger.reserve("0" * 32, [HoldRequest(Budget("user", "r:a", 0), 10, 1)], 60_000)
            config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=1)
            mw = BudgetMiddleware(ok_app, config, ledger=ledger)
            for n in range(20):
                sent = RecordingSend()
                await mw(http_scope(headers=[("x-user", f"u{n}")]), ScriptedReceive(), sent)
                assert sent.status == 503
            assert mw.finalizer.pending == 0
            assert mw.finalizer.releases_dropped == 0
        finally:
            await ledger.aclose()
