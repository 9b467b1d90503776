"""The memory ledger and the Redis scripts agree, operation for operation.

Hypothesis draws a sequence of ledger operations (reserves on 1-3 of four budgets, settles,
duplicate settles, releases, re-reserves of an id, extends, limit overrides, resets, usage reads)
and replays it on a ``MemoryLedger`` and on a ``RedisLedger`` against the real redis-server; every
answer must be the same. Leases are long (an hour), so no hold expires during an example, and the
periodic budgets have a 31-year period, so no window rolls over during an example either.

The test is synchronous and runs each example in its own event loop (``asyncio.run``): Hypothesis
and pytest-asyncio's per-test loops do not mix, and only the session-scoped server fixture is used.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    MemoryLedger,
    RedisLedger,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    Usage,
    new_reservation_id,
)
from redis_server import RedisServer

pytestmark = pytest.mark.redis

LEASE_MS = 3_600_000
LONG_PERIOD_MS = 10**12  # about 31.7 years: the window cannot change during a test
BUDGETS = [
    Budget("user", "r:u1", 0),
    Budget("user", "r:u2", LONG_PERIOD_MS),
    Budget("team", "r:t1", 0),
    Budget("global", "r:all", LONG_PERIOD_MS),
]
LIMITS = [50, 30, 80, 120]


# -- operations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    budgets: tuple[int, ...]
    amounts: tuple[int, ...]


@dataclass(frozen=True)
class ReserveAgain:
    """The same id and holds as an earlier reserve: a retry after a lost reply."""

    index: int


@dataclass(frozen=True)
class Settle:
    index: int
    actual: int


@dataclass(frozen=True)
class Release:
    """The release of a reserve whose reply never came: window -1, no epoch, actual 0."""

    index: int


@dataclass(frozen=True)
class Extend:
    indices: tuple[int, ...]


@dataclass(frozen=True)
class SetLimit:
    budget: int
    limit: int | None


@dataclass(frozen=True)
class Reset:
    budget: int


@dataclass(frozen=True)
class ReadUsage:
    budget: int


Op = Reserve | ReserveAgain | Settle | Release | Extend | SetLimit | Reset | ReadUsage


@st.composite
def reserves(draw: st.DrawFn) -> Reserve:
    picked = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    amounts = draw(st.lists(st.integers(0, 40), min_size=len(picked), max_size=len(picked)))
    return Reserve(tuple(picked), tuple(amounts))


index = st.integers(0, 40)
operations = st.lists(
    st.one_of(
        reserves(),
        reserves(),  # reserves are the common case
        st.builds(ReserveAgain, index),
        st.builds(Settle, index, st.integers(0, 50)),
        st.builds(Settle, index, st.integers(0, 50)),
        st.builds(Release, index),
        st.builds(Extend, st.lists(index, max_size=3).map(tuple)),
        st.builds(SetLimit, st.integers(0, 3), st.none() | st.integers(0, 150)),
        st.builds(Reset, st.integers(0, 3)),
        st.builds(ReadUsage, st.integers(0, 3)),
    ),
    min_size=15,
    max_size=50,
)


# -- comparable views of results ------------------------------------------------------------------


def view_reserve(result: Reservation | Rejection) -> tuple[Any, ...]:
    if isinstance(result, Reservation):
        return (
            "admitted",
            result.replayed,
            tuple(
                (h.budget, h.amount, h.window, h.limit, h.remaining, h.reset_ms) for h in result.holds
            ),
        )
    return (
        "rejected",
        result.rule,
        tuple(
            (v.budget, v.limit, v.spent, v.held, v.amount, v.reset_ms, v.remaining, v.blocked_by_spend)
            for v in result.violations
        ),
    )


def view_settled(result: Settled) -> tuple[Any, ...]:
    return (result.outcomes, result.outcome)


def view_usage(u: Usage) -> tuple[Any, ...]:
    return (u.budget, u.limit, u.spent, u.held, u.holds, u.remaining, u.window, u.reset_ms)


# -- one ledger's run -----------------------------------------------------------------------------


class Run:
    """Applies operations to one ledger and records a comparable trace of its answers."""

    def __init__(self, ledger: Any, ids: list[str]) -> None:
        self.ledger = ledger
        self.ids = ids  # shared by both runs: the same reservation ids on both ledgers
        self.requests: list[list[HoldRequest]] = []
        self.results: list[Reservation | Rejection] = []

    def _pick(self, i: int) -> int | None:
        return i % len(self.results) if self.results else None

    async def apply(self, op: Op) -> tuple[Any, ...]:
        lg = self.ledger
        if isinstance(op, Reserve):
            holds = [
                HoldRequest(BUDGETS[b], LIMITS[b], a)
                for b, a in zip(op.budgets, op.amounts, strict=True)
            ]
            n = len(self.results)
            if n == len(self.ids):
                self.ids.append(new_reservation_id())
            result = await lg.reserve(self.ids[n], holds, LEASE_MS)
            self.requests.append(holds)
            self.results.append(result)
            return ("reserve", view_reserve(result))
        k = self._pick(getattr(op, "index", 0))
        if isinstance(op, ReserveAgain):
            if k is None:
                return ("noop",)
            result = await lg.reserve(self.ids[k], self.requests[k], LEASE_MS)
            if result.admitted or not self.results[k].admitted:
                self.results[k] = result
            return ("again", view_reserve(result))
        if isinstance(op, Settle):
            if k is None or not isinstance(r := self.results[k], Reservation):
                return ("noop",)
            s = Settlement(r.id, r.holds, op.actual, "completed")
            return ("settle", view_settled(await lg.settle(s)))
        if isinstance(op, Release):
            if k is None:
                return ("noop",)
            blind = tuple(
                HeldBudget(h.budget, h.amount, -1, "", h.limit, 0, None) for h in self.requests[k]
            )
            s = Settlement(self.ids[k], blind, 0, "cancelled")
            return ("release", view_settled(await lg.settle(s)))
        if isinstance(op, Extend):
            picked = [self.results[i % len(self.results)] for i in op.indices] if self.results else []
            admitted = [r for r in picked if isinstance(r, Reservation)]
            renewed: Renewed = await lg.extend(admitted, LEASE_MS)
            return ("extend", renewed)
        if isinstance(op, SetLimit):
            await lg.set_limit(BUDGETS[op.budget], op.limit)
            return ("set_limit",)
        if isinstance(op, Reset):
            await lg.reset(BUDGETS[op.budget])
            return ("reset",)
        assert isinstance(op, ReadUsage)
        return ("usage", view_usage(await lg.usage(BUDGETS[op.budget], LIMITS[op.budget])))

    async def final_usage(self) -> list[tuple[Any, ...]]:
        return [
            view_usage(await self.ledger.usage(b, lim)) for b, lim in zip(BUDGETS, LIMITS, strict=True)
        ]


async def run_both(url: str, ops: list[Op]) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    memory = MemoryLedger()
    redis_ledger = RedisLedger(url)
    ids: list[str] = []
    mem_run, redis_run = Run(memory, ids), Run(redis_ledger, ids)
    try:
        for step, op in enumerate(ops):
            expected = await mem_run.apply(op)
            got = await redis_run.apply(op)
            assert got == expected, f"step {step}: {op!r}\n memory: {expected!r}\n  redis: {got!r}"
        assert await redis_run.final_usage() == await mem_run.final_usage()
    finally:
        await redis_ledger.aclose()
        await memory.aclose()


@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=operations)
def test_memory_and_redis_agree(redis_server: RedisServer, ops: list[Op]) -> None:
    asyncio.run(run_both(redis_server.url, ops))
