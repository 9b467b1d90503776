"""BudgetMiddleware, configured from ``BUDGET_*`` like any user's app.

The memory ledger when ``BUDGET_REDIS_URL`` is unset, else the Redis ledger the middleware would
make itself (``make_ledger``), with its client made to count round trips (``common.py``). The
standalone ledger sends its scripts through a pipeline of its own, written on a pooled connection
without the client's ``execute_command``: that pipeline is counted where the ledger calls it.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from budget_middleware import BudgetConfig, BudgetMiddleware, RedisLedger
from budget_middleware.middleware import make_ledger

from .common import build_app, count_round_trips, note_round_trip

config = BudgetConfig.from_env()
ledger = make_ledger(config)
if isinstance(ledger, RedisLedger):
    _connect = ledger._connect
    # The ledger makes its client lazily, per event loop; count whatever it makes.
    ledger._connect = lambda: count_round_trips(_connect())  # type: ignore[method-assign]
    _pipeline = getattr(ledger, "_pipeline", None)
    if _pipeline is not None:

        async def counted_pipeline(calls: list[Any], *, wait: bool) -> list[Any]:
            note_round_trip([["evalsha"]] * len(calls) + ([["wait"]] if wait else []))
            result: list[Any] = await _pipeline(calls, wait=wait)
            return result

        ledger._pipeline = counted_pipeline  # type: ignore[method-assign]


def _middleware(request: Request) -> BudgetMiddleware:
    node: Any = request.app.middleware_stack
    while node is not None:
        if isinstance(node, BudgetMiddleware):
            return node
        node = getattr(node, "app", None)
    raise RuntimeError("BudgetMiddleware is not in the middleware stack")


async def settle_wait(request: Request) -> dict[str, Any]:
    """Wait until every settlement handed over so far is applied; report the finalizer's counts."""
    finalizer = _middleware(request).finalizer
    idle = await finalizer.wait_idle(10)
    return {
        "finalizer_idle": idle,
        "applied": finalizer.applied,
        "lost": finalizer.lost,
        "outcomes": dict(finalizer.outcomes),
    }


app = build_app(settle_wait=settle_wait)
app.add_middleware(BudgetMiddleware, config=config, ledger=ledger)
