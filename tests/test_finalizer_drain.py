"""Draining while the ledger keeps failing ends within its deadline, without a retry storm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from budget_middleware import Finalizer, MemoryLedger, Settled, Settlement
from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    LedgerUnavailable,
    Reservation,
    new_reservation_id,
)


class FailingLedger(MemoryLedger):
    """A ledger whose settles always fail; counts the attempts."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.attempts = 0
        self.settle_now = None  # type: ignore[assignment]  # go through the worker

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        self.attempts += 1
        await anyio.lowlevel.checkpoint()
        raise self.error


def settlement() -> Settlement:
    budget = Budget("user", "r:alice", 0)
    hold = HeldBudget(budget, 5, 0, "epoch", 100, 95, None)
    return Settlement(new_reservation_id(), (hold,), 5, "completed", 5)


@pytest.mark.parametrize(
    "error", [LedgerUnavailable("down"), LedgerError("OOM command not allowed")], ids=str
)
async def test_drain_during_an_outage_ends_on_time_and_counts_the_loss(error: Exception) -> None:
    ledger = FailingLedger(error)
    finalizer = Finalizer(ledger, retry_base_s=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        finalizer.submit(settlement())
        await anyio.sleep(0.05)  # let it fail a first time; backoff starts
        before = ledger.attempts
        with anyio.fail_after(5):  # the drain ends after its deadline, not never
            lost = await finalizer.drain(0.3)
        tg.cancel_scope.cancel()
    assert lost == 1
    assert finalizer.lost == 1
    # Backoff, not a storm: a handful of attempts in the drain's few hundred milliseconds.
    assert ledger.attempts - before < 20, ledger.attempts


async def test_a_refused_settlement_is_given_up_and_does_not_block_the_next() -> None:
    class RefusesOne(MemoryLedger):
        def __init__(self) -> None:
            super().__init__()
            self.settle_now = None  # type: ignore[assignment]
            self.bad: str = ""

        async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
            if any(s.reservation_id == self.bad for s in settlements):
                raise LedgerError("ERR budget settle: bad arguments")
            return [self._settle_one(s, self._clock()) for s in settlements]

    ledger: Any = RefusesOne()
    finalizer = Finalizer(ledger, retry_base_s=0.001, retry_cap_s=0.002)
    bad, good = settlement(), settlement()
    ledger.bad = bad.reservation_id
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        finalizer.submit(bad)
        finalizer.submit(good)
        assert await finalizer.wait_idle(5)
        tg.cancel_scope.cancel()
    assert finalizer.applied == 1  # the good one, not blocked behind the refused one
    assert finalizer.lost == 1


async def test_a_request_after_the_lifespan_shutdown_is_counted_not_left_to_a_new_worker() -> None:
    """After the lifespan drained the finalizer, nothing would drain a worker started later: a late
    request's settlement is counted as lost (and logged) instead of waiting in a stray worker."""
    import fakeredis
    from starlette.types import Message, Receive, Scope, Send

    from asgi_helpers import MessageQueue, RecordingSend, ScriptedReceive, http_scope
    from budget_middleware import BudgetConfig, BudgetMiddleware, RedisLedger, Rule, to_micros

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    ledger = RedisLedger(client=client)
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=to_micros(1))
    mw = BudgetMiddleware(app, config, ledger=ledger)
    lifespan_in = MessageQueue()
    sent: list[Message] = []

    async def lifespan_send(message: Message) -> None:
        sent.append(message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(mw, {"type": "lifespan"}, lifespan_in, lifespan_send)
        lifespan_in.push({"type": "lifespan.startup"})
        lifespan_in.push({"type": "lifespan.shutdown"})
    lifespan_in.close()
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    late = RecordingSend()
    await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), late)
    assert late.status == 200
    assert not mw.finalizer.running
    assert mw.finalizer.lost == 1
    await client.aclose()


async def test_an_unexpected_error_in_the_worker_restarts_it(caplog: pytest.LogCaptureFixture) -> None:
    """A renewal that fails with an error nobody expected (a bug) does not end the worker: it is
    logged, and settlements handed over afterwards are still applied."""

    class BuggyRenewals(MemoryLedger):
        def __init__(self) -> None:
            super().__init__()
            self.settle_now = None  # type: ignore[assignment]  # go through the worker
            self.extends = 0
            self.second_try = anyio.Event()

        async def extend(self, reservations: Any, lease_ms: int) -> Any:
            self.extends += 1
            if self.extends == 2:
                self.second_try.set()
            raise TypeError("a bug in a renewal")

    ledger = BuggyRenewals()
    finalizer = Finalizer(ledger, lease_ms=30, retry_base_s=0.001, retry_cap_s=0.01)
    budget = Budget("user", "r:alice", 0)
    reserved = await ledger.reserve(new_reservation_id(), [HoldRequest(budget, 100, 5)], 30)
    assert isinstance(reserved, Reservation)
    async with anyio.create_task_group() as tg:
        await tg.start(finalizer.run)
        finalizer.track(reserved)  # due for renewal within 10 ms: the renewal raises
        with anyio.fail_after(5):
            await ledger.second_try.wait()  # it failed, and the restarted worker tried again
        finalizer.submit(Settlement(reserved.id, reserved.holds, 3, "completed", 5))
        assert await finalizer.wait_idle(5)
        assert finalizer.running
        tg.cancel_scope.cancel()
    assert finalizer.outcomes == {"applied": 1}
    assert "the finalizer's worker failed unexpectedly" in caplog.text
