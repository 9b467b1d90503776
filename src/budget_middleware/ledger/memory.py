"""The in-process ledger: one process, the embedded default.

Every operation runs without an ``await`` inside, so on one event loop it is atomic. The semantics
are those of the Redis scripts, line for line; the shared test suite holds both to them.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..amounts import check_micros
from ..budgets import Budget
from ._types import (
    HeldBudget,
    HoldFacts,
    HoldRequest,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    SettleOutcome,
    Usage,
    Violation,
    check_lease,
    id_time_ms,
)

__all__ = ["HoldFacts", "MemoryLedger"]

PURGE_BATCH = 64
DAY_MS = 86_400_000
# A settled hold leaves its entry in the expiry heap (removing it there would cost a search); once
# dead entries outnumber live ones by this much, the heap is rebuilt from the live holds, so it
# stays bounded by the holds in flight instead of growing with every request of a lease.
_HEAP_SLACK = 64


_time_ns = time.time_ns


def _wall_clock_ms() -> int:
    return _time_ns() // 1_000_000


@dataclass(slots=True)
class _State:
    epoch: str
    held: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (expiry, amount)
    expiry_heap: list[tuple[int, str]] = field(default_factory=list)  # lazy: checked against holds
    expired: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (purged at, amount)
    done: dict[str, int] = field(default_factory=dict)  # recovered ids -> time
    spent: dict[int, int] = field(default_factory=dict)  # window -> micro-units
    touched_ms: int = 0


def _compact(st: _State) -> None:
    """Rebuild the expiry heap from the live holds, dropping the entries of settled ones."""
    heap = [(expiry, rid) for rid, (expiry, _) in st.holds.items()]
    heapq.heapify(heap)
    st.expiry_heap = heap


class MemoryLedger:
    """A ledger in this process's memory.

    Limits are per process: several workers each enforce the whole limit, so N workers admit up to
    N times the budget. Use the Redis ledger for more than one process.
    """

    def __init__(
        self,
        *,
        horizon_ms: int = DAY_MS,
        clock: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.horizon_ms = horizon_ms
        self._clock = clock
        self._states: dict[tuple[str, str], _State] = {}
        self._limits: dict[tuple[str, str], int] = {}
        self._periods: dict[tuple[str, str], int] = {}
        self._ops = 0

    # -- helpers ---------------------------------------------------------------------------

    def _state(self, budget: Budget, now: int) -> _State:
        key = (budget.rule, budget.entity)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State(epoch=os.urandom(8).hex())
            self._periods[key] = budget.period_ms
        st.touched_ms = now
        return st

    def _purge(self, st: _State, now: int, expired_ids: list[str]) -> int:
        heap = st.expiry_heap
        purged = 0
        while heap and heap[0][0] <= now and purged < PURGE_BATCH:
            expiry, rid = heapq.heappop(heap)
            entry = st.holds.get(rid)
            if entry is None or entry[0] != expiry:
                continue  # settled, or renewed (a newer heap entry exists)
            del st.holds[rid]
            st.held -= entry[1]
            st.expired[rid] = (now, entry[1])
            expired_ids.append(rid)
            purged += 1
        if purged:
            cutoff = now - self.horizon_ms
            for rid in [r for r, (t, _) in st.expired.items() if t <= cutoff]:
                del st.expired[rid]
        return purged

    def _limit(self, budget: Budget, default: int) -> int:
        return self._limits.get((budget.rule, budget.entity), default)

    def _sweep(self, now: int) -> None:
        """Forget what Redis would have expired in budgets idle past the horizon: tombstones,
        recovered ids, and the spend of windows that ended two periods ago. A budget with nothing
        left is dropped; a lifetime budget's spend is its record and stays."""
        idle = now - self.horizon_ms
        for key in [k for k, st in self._states.items() if st.touched_ms < idle and not st.holds]:
            st = self._states[key]
            st.expired.clear()
            st.done.clear()
            period = self._periods.get(key, 0)
            if period:
                for w in [w for w in st.spent if w + 2 * period < now]:
                    del st.spent[w]
            if not st.spent:
                del self._states[key]

    def _tick(self, now: int) -> None:
        self._ops += 1
        if self._ops % 10_000 == 0:
            self._sweep(now)

    # -- the ledger ------------------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection:
        return self.reserve_now(reservation_id, holds, lease_ms)

    def reserve_now(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection:
        """Reserve synchronously: nothing here can block or be cancelled halfway.

        Runs on every request, so the state lookup is inlined and nothing is built that the answer
        does not carry."""
        if len(holds) == 1:  # most requests have one rule
            h = holds[0]
            got = self.reserve_hold(reservation_id, h.budget, h.limit, h.amount, lease_ms)
            if isinstance(got, Rejection):
                return got
            window, epoch, limit, remaining, reset_ms, purged, expired, replay, now = got
            one = HeldBudget(h.budget, h.amount, window, epoch, limit, remaining, reset_ms)
            return Reservation(reservation_id, (one,), lease_ms, now, purged, expired, replay)
        if not holds:
            raise ValueError("reserve needs at least one hold")
        if not 0 < lease_ms <= self.horizon_ms:
            check_lease(lease_ms, self.horizon_ms)
        now = self._clock()
        self._ops += 1
        if self._ops % 10_000 == 0:
            self._sweep(now)
        states = self._states
        limits = self._limits
        expired_ids: list[str] = []
        purged = 0
        rows = []
        for h in holds:
            b = h.budget
            key = (b.rule, b.entity)
            st = states.get(key)
            if st is None:
                st = self._state(b, now)
            else:
                st.touched_ms = now
            heap = st.expiry_heap
            if heap and heap[0][0] <= now:
                purged += self._purge(st, now, expired_ids)
            window = now - now % b.period_ms if b.period_ms else 0
            limit = limits.get(key, h.limit) if limits else h.limit
            rows.append((h, st, window, limit, st.spent.get(window, 0)))

        replay = reservation_id in rows[0][1].holds
        if not replay:
            violations = [
                Violation(h.budget, limit, spent, st.held, h.amount, h.budget.reset_ms(w), now)
                for h, st, w, limit, spent in rows
                if limit - spent - st.held <= 0 or spent + st.held + h.amount > limit
            ]
            if violations:
                return Rejection(reservation_id, tuple(violations), purged, tuple(expired_ids))

        held: list[HeldBudget] = []
        expiry = now + lease_ms
        for h, st, window, limit, spent in rows:
            if not replay:
                st.holds[reservation_id] = (expiry, h.amount)
                heapq.heappush(st.expiry_heap, (expiry, reservation_id))
                st.held += h.amount
            b = h.budget
            held.append(
                HeldBudget(
                    b,
                    h.amount,
                    window,
                    st.epoch,
                    limit,
                    limit - spent - st.held,
                    window + b.period_ms if b.period_ms else None,
                )
            )
        return Reservation(
            reservation_id, tuple(held), lease_ms, now, purged, tuple(expired_ids), replay
        )

    def now(self) -> int:
        """The ledger's time, epoch ms: what its operations read from its clock."""
        clock = self._clock
        return _time_ns() // 1_000_000 if clock is _wall_clock_ms else clock()

    def reserve_hold(
        self,
        reservation_id: str,
        budget: Budget,
        limit: int,
        amount: int,
        lease_ms: int,
        now: int | None = None,
    ) -> HoldFacts | Rejection:
        """Reserve one hold synchronously, without the request and result objects: what a
        middleware with one rule needs on every request, and ``reserve_now`` of one hold. Returns
        the hold's facts (``HoldFacts``), or the ``Rejection``.

        ``now``, read from ``self.now()`` just before, lets a caller make the reservation id
        (``new_reservation_id(now)``) from the same clock read as the reserve."""
        if not 0 < lease_ms <= self.horizon_ms:
            check_lease(lease_ms, self.horizon_ms)
        if now is None:
            now = self.now()
        self._ops += 1
        if self._ops % 10_000 == 0:
            self._sweep(now)
        b = budget
        key = (b.rule, b.entity)
        st = self._states.get(key)
        if st is None:
            st = self._state(b, now)
        else:
            st.touched_ms = now
        purged = 0
        expired_ids: tuple[str, ...] = ()
        heap = st.expiry_heap
        if heap and heap[0][0] <= now:
            found: list[str] = []
            purged = self._purge(st, now, found)
            expired_ids = tuple(found)
        period = b.period_ms
        window = now - now % period if period else 0
        reset_ms = window + period if period else None
        if self._limits:
            limit = self._limits.get(key, limit)
        spent = st.spent.get(window, 0)
        replay = reservation_id in st.holds
        # What the limit leaves before this hold, worked out once for the check and the remaining
        # (amounts and times are big ints here, whose every operation allocates).
        left = limit - spent - st.held
        if not replay:
            if left <= 0 or amount > left:  # spent + held + amount > limit
                violation = Violation(b, limit, spent, st.held, amount, reset_ms, now)
                return Rejection(reservation_id, (violation,), purged, expired_ids)
            expiry = now + lease_ms
            st.holds[reservation_id] = (expiry, amount)
            heapq.heappush(heap, (expiry, reservation_id))
            st.held += amount
            left -= amount
        return window, st.epoch, limit, left, reset_ms, purged, expired_ids, replay, now

    def _settle_one(self, s: Settlement, now: int | None = None) -> Settled:
        actual = s.actual
        rid = s.reservation_id
        holds = s.holds
        if len(holds) == 1:
            hb = holds[0]
            return Settled(rid, (self.settle_hold(rid, hb.budget, hb.window, hb.epoch, actual, now),))
        if actual < 0 or (actual and any(hb.window < 0 for hb in holds)):
            raise ValueError("a settle needs actual >= 0, and a release (window -1) actual 0")
        if now is None:
            now = self._clock()
        return Settled(
            rid,
            tuple(self.settle_hold(rid, hb.budget, hb.window, hb.epoch, actual, now) for hb in holds),
        )

    def settle_hold(
        self,
        reservation_id: str,
        budget: Budget,
        window: int,
        epoch: str,
        actual: int,
        now: int | None = None,
    ) -> SettleOutcome:
        """Settle one hold synchronously, without the settlement objects: remove it (or its
        tombstone) and add ``actual`` to spent. A settle of one hold is this, and a settle of
        several is this for each, at one ``now``. Returns the hold's outcome."""
        if actual < 0 or (actual and window < 0):
            raise ValueError("a settle needs actual >= 0, and a release (window -1) actual 0")
        if now is None:
            clock = self._clock
            now = _time_ns() // 1_000_000 if clock is _wall_clock_ms else clock()
        rid = reservation_id
        b = budget
        st = self._states.get((b.rule, b.entity))
        if st is None:
            st = self._state(b, now)
        else:
            st.touched_ms = now
        outcome: SettleOutcome
        entry = st.holds.pop(rid, None)
        if entry is not None:
            st.held -= entry[1]
            outcome = "applied"
            if not st.holds:
                st.expiry_heap.clear()  # only settled entries were left in it
            elif len(st.expiry_heap) > 2 * len(st.holds) + _HEAP_SLACK:
                _compact(st)
        elif st.expired.pop(rid, None) is not None:
            outcome = "late"
        elif window < 0:
            return "duplicate"  # the release of a reserve that never landed: nothing held
        elif st.epoch == epoch:
            return "stale" if self._old(rid, now) else "duplicate"
        elif rid in st.done:
            return "duplicate"
        elif self._old(rid, now):
            return "stale"
        else:
            outcome = "recovered"
            st.done[rid] = now
            cutoff = now - self.horizon_ms
            for done_id in [d for d, t in st.done.items() if t <= cutoff]:
                del st.done[done_id]
        if actual and window >= 0:
            spent = st.spent
            before = spent.get(window)
            if before is None:
                spent[window] = actual
                self._tidy_windows(st, b, window, now)
            else:
                spent[window] = before + actual
        return outcome

    def _old(self, reservation_id: str, now: int) -> bool:
        return id_time_ms(reservation_id) < now - self.horizon_ms

    @staticmethod
    def _tidy_windows(st: _State, budget: Budget, written: int, now: int) -> None:
        period = budget.period_ms
        if period and len(st.spent) > 2:
            for w in [w for w in st.spent if w != written and w + 2 * period < now]:
                del st.spent[w]

    def settle_now(self, settlement: Settlement) -> Settled:
        """Settle synchronously: the memory ledger cannot fail or block, so the finalizer applies
        its settlements at once instead of queueing them."""
        return self._settle_one(settlement)

    async def settle(self, settlement: Settlement) -> Settled:
        holds = settlement.holds
        if len(holds) == 1:  # _settle_one of one hold, one call shorter
            hb = holds[0]
            rid = settlement.reservation_id
            return Settled(
                rid, (self.settle_hold(rid, hb.budget, hb.window, hb.epoch, settlement.actual),)
            )
        return self._settle_one(settlement)

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        now = self._clock()
        return [self._settle_one(s, now) for s in settlements]

    async def extend(self, reservations: Sequence[Reservation], lease_ms: int) -> Renewed:
        check_lease(lease_ms, self.horizon_ms)
        now = self._clock()
        renewed = reheld = missing = 0
        expiry = now + lease_ms
        for r in reservations:
            for hb in r.holds:
                st = self._state(hb.budget, now)
                entry = st.holds.get(r.id)
                if entry is not None:
                    st.holds[r.id] = (expiry, entry[1])
                    heapq.heappush(st.expiry_heap, (expiry, r.id))
                    renewed += 1
                elif (tomb := st.expired.pop(r.id, None)) is not None:
                    st.holds[r.id] = (expiry, tomb[1])
                    heapq.heappush(st.expiry_heap, (expiry, r.id))
                    st.held += tomb[1]
                    reheld += 1
                else:
                    missing += 1
        return Renewed(renewed, reheld, missing)

    async def usage(self, budget: Budget, limit: int) -> Usage:
        now = self._clock()
        st = self._states.get((budget.rule, budget.entity))
        window = budget.window_of(now)
        limit = self._limit(budget, limit)
        if st is None:
            return Usage(budget, limit, 0, 0, 0, window, budget.reset_ms(window), now)
        purged = self._purge(st, now, [])
        return Usage(
            budget,
            limit,
            st.spent.get(window, 0),
            st.held,
            len(st.holds),
            window,
            budget.reset_ms(window),
            now,
            purged,
        )

    async def set_limit(self, budget: Budget, limit: int | None) -> None:
        key = (budget.rule, budget.entity)
        if limit is None:
            self._limits.pop(key, None)
        else:
            self._limits[key] = check_micros(limit, what="limit")

    async def reset(self, budget: Budget) -> None:
        st = self._states.get((budget.rule, budget.entity))
        if st is not None:
            st.spent.pop(budget.window_of(self._clock()), None)

    async def aclose(self) -> None:
        return None
