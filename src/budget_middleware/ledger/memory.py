"""The in-process ledger: one process, the embedded default.

Every operation runs without an ``await`` inside, so on one event loop it is atomic. The semantics
are those of the Redis scripts, line for line; the shared test suite holds both to them.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Sequence

from ..amounts import check_micros
from ..budgets import Budget
from ._memory_state import HEAP_SLACK, BudgetState, compact, forget_older, purge_expired, tidy_windows
from ._types import (
    HeldBudget,
    HoldRequest,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    SettleOutcome,
    Usage,
    Violation,
    admits,
    check_lease,
    id_time_ms,
)

__all__ = ["MemoryLedger"]

DAY_MS = 86_400_000
# Every _SWEEP_EVERY operations, at most _SWEEP_BATCH budgets idle past the horizon are forgotten.
_SWEEP_EVERY = 1_000
_SWEEP_BATCH = 256


_time_ns = time.time_ns


def _wall_clock_ms() -> int:
    return _time_ns() // 1_000_000


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
        self._states: dict[tuple[str, str], BudgetState] = {}
        self._limits: dict[tuple[str, str], int] = {}
        # When each budget may have been idle for a horizon: (due ms, key), one entry per budget,
        # pushed when it is made and again when a sweep finds it used since. A sweep pops only
        # what is due, so forgetting idle budgets costs O(log N) per budget, not O(N) per pass.
        self._idle_heap: list[tuple[int, tuple[str, str]]] = []
        self._ops = 0

    # -- helpers ---------------------------------------------------------------------------

    def _state(self, budget: Budget, now: int) -> BudgetState:
        key = (budget.rule, budget.entity)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = BudgetState(epoch=os.urandom(8).hex(), period_ms=budget.period_ms)
            heapq.heappush(self._idle_heap, (now + self.horizon_ms, key))
        st.touched_ms = now
        return st

    def _purge(self, st: BudgetState, now: int, expired_ids: list[str]) -> int:
        return purge_expired(st, now, self.horizon_ms, expired_ids)

    def _limit(self, budget: Budget, default: int) -> int:
        return self._limits.get((budget.rule, budget.entity), default)

    def _sweep(self, now: int) -> None:
        """Forget what Redis would have expired in budgets idle past the horizon: tombstones,
        recovered ids, and the spend of windows that ended two periods ago. A budget with nothing
        left is dropped; a lifetime budget's spend is its record and stays. At most
        ``_SWEEP_BATCH`` budgets are looked at per call, the ones whose horizon is due."""
        heap = self._idle_heap
        states = self._states
        for _ in range(_SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                return
            _, key = heapq.heappop(heap)
            st = states.get(key)
            if st is None:
                continue
            idle_since = st.touched_ms + self.horizon_ms
            if idle_since > now or st.holds:
                heapq.heappush(heap, (max(idle_since, now + 1), key))
                continue
            st.expired.clear()
            st.done.clear()
            period = st.period_ms
            if period:
                for w in [w for w in st.spent if w + 2 * period < now]:
                    del st.spent[w]
            if st.spent:
                heapq.heappush(heap, (now + self.horizon_ms, key))  # a record: look again later
            else:
                del states[key]

    def _tick(self, now: int) -> None:
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
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
            return self._reserve_one(reservation_id, holds[0], lease_ms)
        if not holds:
            raise ValueError("reserve needs at least one hold")
        if not 0 < lease_ms <= self.horizon_ms:
            check_lease(lease_ms, self.horizon_ms)
        now = self._clock()
        self._tick(now)
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
            window = b.window_of(now)
            limit = limits.get(key, h.limit) if limits else h.limit
            rows.append((h, st, window, limit, st.spent.get(window, 0)))

        replay = reservation_id in rows[0][1].holds
        if not replay:
            violations = [
                Violation(h.budget, limit, spent, st.held, h.amount, h.budget.reset_ms(w), now)
                for h, st, w, limit, spent in rows
                if not admits(limit, spent, st.held, h.amount)
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
                    b.reset_ms(window),
                    now,
                )
            )
        return Reservation(
            reservation_id, tuple(held), lease_ms, now, purged, tuple(expired_ids), replay
        )

    def _reserve_one(
        self, reservation_id: str, h: HoldRequest, lease_ms: int
    ) -> Reservation | Rejection:
        """``reserve_now`` of one hold, what most requests take: the same steps without the loops."""
        if not 0 < lease_ms <= self.horizon_ms:
            check_lease(lease_ms, self.horizon_ms)
        clock = self._clock
        now = _time_ns() // 1_000_000 if clock is _wall_clock_ms else clock()
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now)
        b = h.budget
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
        window = b.window_of(now)
        reset_ms = b.reset_ms(window)
        limit = self._limits.get(key, h.limit) if self._limits else h.limit
        spent = st.spent.get(window, 0)
        amount = h.amount
        replay = reservation_id in st.holds
        if not replay:
            if not admits(limit, spent, st.held, amount):
                violation = Violation(b, limit, spent, st.held, amount, reset_ms, now)
                return Rejection(reservation_id, (violation,), purged, expired_ids)
            expiry = now + lease_ms
            st.holds[reservation_id] = (expiry, amount)
            heapq.heappush(heap, (expiry, reservation_id))
            st.held += amount
        held = HeldBudget(b, amount, window, st.epoch, limit, limit - spent - st.held, reset_ms, now)
        return Reservation(reservation_id, (held,), lease_ms, now, purged, expired_ids, replay)

    def _settle_one(self, s: Settlement, now: int | None = None) -> Settled:
        actual = s.actual
        rid = s.reservation_id
        holds = s.holds
        if len(holds) == 1:
            hb = holds[0]
            return Settled(rid, (self._settle_hold(rid, hb, actual, now),))
        if actual < 0 or (actual and any(hb.window < 0 for hb in holds)):
            raise ValueError("a settle needs actual >= 0, and a release (window -1) actual 0")
        if now is None:
            now = self._clock()
        return Settled(
            rid,
            tuple(self._settle_hold(rid, hb, actual, now) for hb in holds),
        )

    def _settle_hold(
        self, reservation_id: str, hb: HeldBudget, actual: int, now: int | None = None
    ) -> SettleOutcome:
        """Settle one hold: remove it (or its tombstone) and add ``actual`` to spent. A settle of
        several holds is this for each, at one ``now``. Returns the hold's outcome."""
        budget, window, epoch = hb.budget, hb.window, hb.epoch
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
            elif len(st.expiry_heap) > 2 * len(st.holds) + HEAP_SLACK:
                compact(st)
        elif st.expired.pop(rid, None) is not None:
            outcome = "late"
        elif window < 0:
            return "duplicate"  # the release of a reserve that never landed: nothing held
        elif st.epoch == epoch:
            return "stale" if self._old(rid, hb.reserved_ms, now) else "duplicate"
        elif rid in st.done:
            return "duplicate"
        elif self._old(rid, hb.reserved_ms, now):
            return "stale"
        else:
            outcome = "recovered"
            st.done[rid] = now
            forget_older(st.done, now - self.horizon_ms)
        if actual and window >= 0:
            spent = st.spent
            before = spent.get(window)
            if before is None:
                spent[window] = actual
                tidy_windows(st, b.period_ms, window, now)
            else:
                spent[window] = before + actual
        return outcome

    def _old(self, reservation_id: str, reserved_ms: int, now: int) -> bool:
        """Whether a settle is older than the tombstone horizon, on the ledger's clock: the time
        the reserve read from it, or (unknown: an old journal line, a release) the id's."""
        return (reserved_ms or id_time_ms(reservation_id)) < now - self.horizon_ms

    def settle_now(self, settlement: Settlement) -> Settled:
        """Settle synchronously: the memory ledger cannot fail or block, so the finalizer applies
        its settlements at once instead of queueing them."""
        holds = settlement.holds
        if len(holds) == 1:  # most requests have one rule
            hb = holds[0]
            rid = settlement.reservation_id
            outcome = self._settle_hold(rid, hb, settlement.actual)
            return Settled(rid, (outcome,))
        return self._settle_one(settlement)

    async def settle(self, settlement: Settlement) -> Settled:
        holds = settlement.holds
        if len(holds) == 1:  # _settle_one of one hold, one call shorter
            hb = holds[0]
            rid = settlement.reservation_id
            return Settled(rid, (self._settle_hold(rid, hb, settlement.actual),))
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
