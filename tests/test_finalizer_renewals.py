"""Lease renewals: a heap of due times, bounded by the requests in flight, and a quiet worker.

The worker finds the next renewal at the top of a heap instead of scanning every request in flight;
a request that ends leaves a stale entry that is skipped (lazy deletion), and the heap is rebuilt
when stale entries outnumber live ones, so it does not grow with ids that come and go. The idle
worker sleeps up to a third of the lease; a request tracked meanwhile does not wake it, and a drain
does not wait for it to wake by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asgi_helpers import wait_until
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.finalizer._recording import Recorder
from budget_middleware.finalizer._renewals import Renewals
from budget_middleware.identity import EntityHasher
from budget_middleware.ledger import (
    HoldRequest,
    MemoryLedger,
    Renewed,
    Reservation,
    Settlement,
    new_reservation_id,
)

BUDGET = Budget("user", "r:alice", 0)


class CountingExtends(MemoryLedger):
    """The memory ledger, settled by the worker, counting the leases each renewal carries."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]
        self.renewed: list[list[str]] = []

    async def extend(self, reservations: Sequence[Reservation], lease_ms: int) -> Renewed:
        self.renewed.append([r.id for r in reservations])
        return await super().extend(reservations, lease_ms)


def reservation(ledger: MemoryLedger, lease_ms: int) -> Reservation:
    r = ledger.reserve_now(new_reservation_id(), [HoldRequest(BUDGET, 10**12, 1)], lease_ms)
    assert isinstance(r, Reservation)
    return r


def renewals() -> Renewals:
    from budget_middleware.finalizer._counters import Counters

    return Renewals(Recorder(Counters(), hasher=EntityHasher(), span_raw_ids=False, on_settled=None))


def test_the_heap_gives_the_due_reservations_in_order_and_skips_those_that_ended() -> None:
    ledger = MemoryLedger()
    due = renewals()
    a, b, c = (reservation(ledger, 60_000) for _ in range(3))
    due.track(a, 3.0)
    due.track(b, 1.0)
    due.track(c, 2.0)
    due.forget(b.id)  # its request ended
    assert due.next_due() == 2.0
    assert due.pop_due(2.5) == [c]
    assert due.next_due() == 3.0
    due.schedule([c], 10.0)  # renewed: due again later
    due.schedule([b], 0.5)  # gone: not scheduled again
    assert due.pop_due(5.0) == [a]
    assert due.pop_due(10.0) == [c]
    assert len(due) == 2  # a and c are still in flight until their requests end


def test_the_heap_does_not_grow_with_requests_that_come_and_go() -> None:
    ledger = MemoryLedger()
    due = renewals()
    long_running = [reservation(ledger, 60_000) for _ in range(10)]
    for n, r in enumerate(long_running):
        due.track(r, 1_000.0 + n)
    for n in range(20_000):  # short requests: tracked, then ended before any renewal
        r = reservation(ledger, 60_000)
        due.track(r, 20.0 + n / 1000)
        due.forget(r.id)
    assert len(due) == 10
    assert due.heap_size() <= 2 * 10 + 64 + 1
    assert due.next_due() == 1_000.0


async def test_a_request_longer_than_its_lease_is_renewed_and_one_that_ended_is_not() -> None:
    ledger = CountingExtends()
    fin = Finalizer(ledger, lease_ms=300)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        running, ended = reservation(ledger, 300), reservation(ledger, 300)
        fin.track(running)
        fin.track(ended)
        fin.submit(Settlement(ended.id, ended.holds, 1, "completed", 1))
        await wait_until(lambda: len(ledger.renewed) >= 3, what="three renewals")
        assert all(ids == [running.id] for ids in ledger.renewed)
        fin.submit(Settlement(running.id, running.holds, 1, "completed", 1))
        assert await fin.drain(2) == 0
        tg.cancel_scope.cancel()
    usage = await ledger.usage(BUDGET, 10**12)
    assert (usage.spent, usage.held) == (2, 0)


async def test_a_tracked_request_does_not_wake_the_idle_worker() -> None:
    """With the finalizer's lease, a new request is due a third of a lease from now: never before
    the idle worker wakes by itself, so tracking it sets nothing."""
    ledger = CountingExtends()
    fin = Finalizer(ledger, lease_ms=60_000)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        await wait_until(lambda: fin._wait_until > 0, what="the worker to sleep")
        wakeup = fin._wakeup
        assert wakeup is not None
        for _ in range(100):
            fin.track(reservation(ledger, 60_000))
        assert not wakeup.is_set()
        # A lease shorter than the finalizer's is due before the worker wakes: it does wake it.
        fin.track(reservation(ledger, 300))
        assert wakeup.is_set()
        tg.cancel_scope.cancel()


async def test_a_drain_does_not_wait_for_the_idle_worker_to_wake_by_itself() -> None:
    """The idle worker sleeps a third of a 10-minute lease; a drain ends as soon as nothing is
    pending, not when the worker would have woken."""
    ledger = CountingExtends()
    fin = Finalizer(ledger, lease_ms=600_000)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        r = reservation(ledger, 600_000)
        fin.track(r)
        await wait_until(lambda: fin._wait_until > 0, what="the worker to sleep")
        fin.submit(Settlement(r.id, r.holds, 1, "completed", 1))
        with anyio.fail_after(10):  # far less than the 200 s the worker would sleep
            assert await fin.drain(300) == 0
        assert not fin.running
        tg.cancel_scope.cancel()
    assert fin.outcomes == {"applied": 1}


async def test_waiting_for_running_requests_does_not_spin_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiter for running requests (what ``drain`` does first) needs a notification when one
    hands its settlement over, not worker passes: with one request in flight and nothing due, the
    worker stays asleep while the waiter waits."""
    ledger = CountingExtends()
    fin = Finalizer(ledger, lease_ms=60_000)
    passes = 0
    renew_due = Renewals.renew_due

    async def counting_renew_due(self: Renewals, *args: Any) -> None:
        nonlocal passes
        passes += 1
        await renew_due(self, *args)

    monkeypatch.setattr(Renewals, "renew_due", counting_renew_due)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        r = reservation(ledger, 60_000)
        fin.track(r)
        before = passes
        assert not await fin.wait_idle(0.3, requests=True)  # the request still runs
        spun = passes - before
        fin.submit(Settlement(r.id, r.holds, 1, "completed", 1))
        assert await fin.wait_idle(5, requests=True)
        tg.cancel_scope.cancel()
    assert spun < 50, f"the worker looped {spun} times while one request ran"
