"""The finalizer around an app's lifespan, and started lazily without one (asyncio and trio).

An app whose own lifespan raises sees its own exception, not the task group's ``ExceptionGroup``.
Without a lifespan the first request starts the worker on whatever loop anyio runs on: asyncio, or
trio, where a request is served and settled through the worker as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest
import trio
from starlette.types import Message, Receive, Scope, Send

from asgi_helpers import LedgerProxy, MessageQueue, RecordingSend, ScriptedReceive, http_scope
from budget_middleware import BudgetConfig, BudgetMiddleware, Rule, to_micros
from budget_middleware.budgets import Budget
from budget_middleware.ledger import MemoryLedger, Settled, Settlement

LIMIT = "100"


class WorkerSettledLedger(MemoryLedger):
    """The memory ledger whose settles go through the finalizer's worker."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        await anyio.lowlevel.checkpoint()
        return await super().settle_many(settlements)


def config() -> BudgetConfig:
    return BudgetConfig(rules=(Rule("user", "header:x-user", LIMIT, "none"),), estimate=to_micros(2))


class StartupFailed(RuntimeError):
    pass


async def failing_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    raise StartupFailed("the app's own startup failed")


async def test_an_app_whose_lifespan_raises_sees_its_own_exception() -> None:
    mw = BudgetMiddleware(failing_lifespan, config(), ledger=MemoryLedger())
    lifespan_in = MessageQueue()
    sent: list[Message] = []

    async def lifespan_send(message: Message) -> None:
        sent.append(message)

    lifespan_in.push({"type": "lifespan.startup"})
    with pytest.raises(StartupFailed) as raised:
        await mw({"type": "lifespan"}, lifespan_in, lifespan_send)
    lifespan_in.close()
    assert type(raised.value) is StartupFailed
    assert not mw.finalizer.running  # drained and stopped on the way out


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_without_lifespan_a_request_under_trio_is_served_and_settled_by_the_worker() -> None:
    ledger = WorkerSettledLedger()
    mw = BudgetMiddleware(ok_app, config(), ledger=ledger)
    budget = Budget("user", "r:alice", 0)

    async def main() -> tuple[int, int, int, bool]:
        sent = RecordingSend()
        await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), sent)
        assert sent.status == 200
        assert await mw.finalizer.wait_idle(5)
        running = mw.finalizer.running  # the lazily started worker applied the settlement
        usage = await ledger.usage(budget, to_micros(LIMIT))
        assert await mw.finalizer.drain(2) == 0
        return usage.spent, usage.held, mw.finalizer.applied, running

    spent, held, applied, running = trio.run(main)
    assert (spent, held, applied) == (to_micros(2), 0, 1)
    assert running


def test_under_trio_an_async_ledger_reserves_with_its_timeout() -> None:
    """A ledger that is not synchronous is reserved with a timeout: under trio, with anyio's,
    since asyncio's needs an asyncio loop (it raised RuntimeError there)."""
    ledger = MemoryLedger()
    proxy = LedgerProxy(ledger)
    mw = BudgetMiddleware(ok_app, config(), ledger=proxy)
    budget = Budget("user", "r:alice", 0)

    async def main() -> tuple[int, int]:
        sent = RecordingSend()
        await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), sent)
        assert sent.status == 200
        assert await mw.finalizer.wait_idle(5)
        usage = await ledger.usage(budget, to_micros(LIMIT))
        assert await mw.finalizer.drain(2) == 0
        return usage.spent, usage.held

    assert trio.run(main) == (to_micros(2), 0)
