"""The ledger contract (DESIGN.md section 4), on every backend: memory, fakeredis, real Redis.

Budgets are lifetime budgets (``period_ms=0``) unless a test is about windows, so no test depends
on where the wall clock sits in a window. Waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    MemoryLedger,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    Usage,
    new_reservation_id,
)

LONG_LEASE_MS = 60_000
HOUR_MS = 3_600_000
T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------------


def budget(rule: str = "user", entity: str = "r:alice", period_ms: int = 0) -> Budget:
    return Budget(rule, entity, period_ms)


def hold(b: Budget, limit: int, amount: int) -> HoldRequest:
    return HoldRequest(b, limit, amount)


async def reserve(
    ledger: Any, *holds: HoldRequest, lease_ms: int = LONG_LEASE_MS, rid: str | None = None
) -> Reservation | Rejection:
    return await ledger.reserve(rid or new_reservation_id(), list(holds), lease_ms)


async def admit(
    ledger: Any, *holds: HoldRequest, lease_ms: int = LONG_LEASE_MS, rid: str | None = None
) -> Reservation:
    result = await reserve(ledger, *holds, lease_ms=lease_ms, rid=rid)
    assert isinstance(result, Reservation), result
    return result


async def refuse(ledger: Any, *holds: HoldRequest, lease_ms: int = LONG_LEASE_MS) -> Rejection:
    result = await reserve(ledger, *holds, lease_ms=lease_ms)
    assert isinstance(result, Rejection), result
    return result


def settlement(r: Reservation, actual: int, reason: str = "completed") -> Settlement:
    return Settlement(r.id, r.holds, actual, reason, estimate=max(h.amount for h in r.holds))


async def settle(ledger: Any, r: Reservation, actual: int) -> Settled:
    return await ledger.settle(settlement(r, actual))


async def usage(ledger: Any, b: Budget, limit: int = 100) -> Usage:
    return await ledger.usage(b, limit)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    within: float = 5.0,
    interval: float = 0.01,
) -> T:
    """Poll ``probe`` until ``accept`` holds for its result; fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(interval)


async def wait_purged(ledger: Any, b: Budget, limit: int = 100) -> Usage:
    """Wait until every hold of ``b`` has expired and been purged (usage purges)."""
    return await eventually(lambda: usage(ledger, b, limit), lambda u: u.holds == 0)


# -- reservation ----------------------------------------------------------------------------------


class TestAllOrNothing:
    async def test_admits_every_hold(self, ledger: Any) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        r = await admit(ledger, hold(a, 10, 4), hold(b, 20, 4))
        assert [h.budget for h in r.holds] == [a, b]
        assert [(h.amount, h.limit, h.remaining) for h in r.holds] == [(4, 10, 6), (4, 20, 16)]
        assert (await usage(ledger, a, 10)).held == 4
        assert (await usage(ledger, b, 20)).held == 4

    @pytest.mark.parametrize("failing", [0, 1, 2])
    async def test_rejection_on_one_budget_holds_nothing_anywhere(
        self, ledger: Any, failing: int
    ) -> None:
        budgets = [budget("user"), budget("team", "r:t1"), budget("global", "r:all")]
        limits = [10, 10, 10]
        limits[failing] = 3
        rej = await refuse(ledger, *(hold(b, lim, 5) for b, lim in zip(budgets, limits, strict=True)))
        assert [v.budget for v in rej.violations] == [budgets[failing]]
        assert rej.rule == budgets[failing].rule
        for b, lim in zip(budgets, limits, strict=True):
            u = await usage(ledger, b, lim)
            assert (u.held, u.holds, u.spent) == (0, 0, 0)
        # And the others still admit their full limit: nothing was left behind.
        others = [i for i in range(3) if i != failing]
        await admit(ledger, *(hold(budgets[i], 10, 10) for i in others))

    async def test_every_violated_budget_is_reported(self, ledger: Any) -> None:
        a, b, c = budget("user"), budget("team", "r:t1"), budget("global", "r:all")
        rej = await refuse(ledger, hold(a, 2, 5), hold(b, 10, 5), hold(c, 4, 5))
        assert [v.budget for v in rej.violations] == [a, c]
        assert rej.rule == "user"


class TestRejectionFields:
    async def test_blocked_by_spend(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        r = await admit(ledger, hold(b, 10, 8))
        await settle(ledger, r, 8)
        rej = await refuse(ledger, hold(b, 10, 5))
        (v,) = rej.violations
        assert rej.rule == "user"
        assert (v.budget, v.limit, v.spent, v.held, v.amount) == (b, 10, 8, 0, 5)
        assert v.remaining == 2
        assert v.blocked_by_spend is True
        assert v.reset_ms is not None
        assert v.reset_ms % HOUR_MS == 0
        assert v.reset_after is not None
        assert 0 < v.reset_after <= HOUR_MS / 1000
        assert v.reset_after == pytest.approx((v.reset_ms - v.now_ms) / 1000)

    async def test_exhausted_by_spend(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        await settle(ledger, await admit(ledger, hold(b, 10, 10)), 10)
        (v,) = (await refuse(ledger, hold(b, 10, 1))).violations
        assert (v.remaining, v.blocked_by_spend) == (0, True)

    async def test_blocked_by_holds(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        await admit(ledger, hold(b, 10, 8))  # live, not settled
        (v,) = (await refuse(ledger, hold(b, 10, 5))).violations
        assert (v.limit, v.spent, v.held, v.remaining) == (10, 0, 8, 2)
        assert v.blocked_by_spend is False  # waiting for the hold to settle can help

    async def test_blocked_by_holds_and_some_spend(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        await settle(ledger, await admit(ledger, hold(b, 10, 3)), 3)
        await admit(ledger, hold(b, 10, 6))
        (v,) = (await refuse(ledger, hold(b, 10, 4))).violations
        assert (v.spent, v.held, v.remaining, v.blocked_by_spend) == (3, 6, 1, False)

    async def test_lifetime_budget_has_no_reset(self, ledger: Any) -> None:
        b = budget(period_ms=0)
        await settle(ledger, await admit(ledger, hold(b, 10, 10)), 10)
        (v,) = (await refuse(ledger, hold(b, 10, 1))).violations
        assert v.reset_ms is None
        assert v.reset_after is None
        assert v.blocked_by_spend is True


class TestAdmissionNeedsRoom:
    async def test_zero_estimate_rejected_on_exhausted_budget(self, ledger: Any) -> None:
        b = budget()
        await settle(ledger, await admit(ledger, hold(b, 10, 10)), 10)
        (v,) = (await refuse(ledger, hold(b, 10, 0))).violations
        assert (v.remaining, v.amount) == (0, 0)

    async def test_zero_estimate_rejected_when_holds_fill_the_budget(self, ledger: Any) -> None:
        b = budget()
        await admit(ledger, hold(b, 10, 10))
        await refuse(ledger, hold(b, 10, 0))

    async def test_admitted_while_remaining_is_positive(self, ledger: Any) -> None:
        b = budget()
        await settle(ledger, await admit(ledger, hold(b, 10, 9)), 9)
        zero = await admit(ledger, hold(b, 10, 0))
        assert zero.holds[0].remaining == 1
        await refuse(ledger, hold(b, 10, 2))
        one = await admit(ledger, hold(b, 10, 1))  # exactly fills it
        assert one.holds[0].remaining == 0
        await refuse(ledger, hold(b, 10, 0))


class TestIdempotentReserve:
    async def test_same_id_twice_holds_once(self, ledger: Any) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        rid = new_reservation_id()
        first = await admit(ledger, hold(a, 10, 4), hold(b, 10, 4), rid=rid)
        again = await admit(ledger, hold(a, 10, 4), hold(b, 10, 4), rid=rid)
        assert (first.replayed, again.replayed) == (False, True)
        assert again.id == first.id
        assert [(h.window, h.epoch) for h in again.holds] == [(h.window, h.epoch) for h in first.holds]
        for x in (a, b):
            u = await usage(ledger, x, 10)
            assert (u.held, u.holds) == (4, 1)
        assert (await settle(ledger, again, 3)).outcome == "applied"
        assert (await settle(ledger, first, 3)).outcome == "duplicate"
        for x in (a, b):
            u = await usage(ledger, x, 10)
            assert (u.held, u.spent) == (0, 3)

    async def test_replay_is_not_rejected_by_its_own_hold(self, ledger: Any) -> None:
        b = budget()
        rid = new_reservation_id()
        await admit(ledger, hold(b, 10, 10), rid=rid)  # fills the budget
        again = await admit(ledger, hold(b, 10, 10), rid=rid)
        assert again.replayed is True
        assert (await usage(ledger, b, 10)).held == 10


# -- settlement -----------------------------------------------------------------------------------


class TestSettle:
    async def test_applied_then_duplicate(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 100, 10))
        first = await settle(ledger, r, 7)
        assert (first.reservation_id, first.outcomes, first.outcome) == (r.id, ("applied",), "applied")
        u = await usage(ledger, b)
        assert (u.spent, u.held, u.holds, u.remaining) == (7, 0, 0, 93)
        second = await settle(ledger, r, 7)
        assert (second.outcomes, second.outcome) == (("duplicate",), "duplicate")
        assert (await usage(ledger, b)).spent == 7

    async def test_zero_actual_releases_the_hold(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 100, 10))
        assert (await settle(ledger, r, 0)).outcome == "applied"
        u = await usage(ledger, b)
        assert (u.spent, u.held) == (0, 0)

    async def test_overrun_is_charged_in_full(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 20, 5))
        assert (await settle(ledger, r, 18)).outcome == "applied"
        u = await usage(ledger, b, 20)
        assert (u.spent, u.held, u.remaining) == (18, 0, 2)
        # The next reserve sees it.
        (v,) = (await refuse(ledger, hold(b, 20, 3))).violations
        assert (v.spent, v.remaining) == (18, 2)
        await admit(ledger, hold(b, 20, 2))

    async def test_overrun_beyond_the_limit_is_still_recorded(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 10, 5))
        await settle(ledger, r, 25)
        u = await usage(ledger, b, 10)
        assert (u.spent, u.remaining) == (25, 0)
        (v,) = (await refuse(ledger, hold(b, 10, 0))).violations
        assert v.blocked_by_spend is True

    async def test_actual_added_to_every_budget(self, ledger: Any) -> None:
        budgets = [budget("user"), budget("team", "r:t1"), budget("global", "r:all", HOUR_MS)]
        r = await admit(ledger, *(hold(b, 100, 30) for b in budgets))
        settled = await settle(ledger, r, 12)
        assert settled.outcomes == ("applied", "applied", "applied")
        for b, h in zip(budgets, r.holds, strict=True):
            u = await usage(ledger, b)
            assert u.held == 0
            if u.window == h.window:  # else the hour rolled over since the reserve
                assert u.spent == 12

    async def test_settle_many(self, ledger: Any) -> None:
        b = budget()
        rs = [await admit(ledger, hold(b, 100, 10)) for _ in range(4)]
        batch = [settlement(r, i) for i, r in enumerate(rs)]
        batch.append(settlement(rs[0], 0))  # a duplicate inside the batch
        out = await ledger.settle_many(batch)
        assert [s.outcome for s in out] == ["applied"] * 4 + ["duplicate"]
        assert [s.reservation_id for s in out] == [s.reservation_id for s in batch]
        u = await usage(ledger, b)
        assert (u.spent, u.held) == (0 + 1 + 2 + 3, 0)

    async def test_settle_many_empty(self, ledger: Any) -> None:
        assert await ledger.settle_many([]) == []

    async def test_settlement_without_holds_is_a_no_op(self, ledger: Any) -> None:
        out = await ledger.settle(Settlement(new_reservation_id(), (), 5, "completed"))
        assert (out.outcomes, out.outcome) == ((), "duplicate")


class TestReleaseOfAnUnansweredReserve:
    """A reserve whose reply never came is followed by a release: window -1, no epoch, actual 0."""

    @staticmethod
    def release(rid: str, holds: list[HoldRequest]) -> Settlement:
        blind = tuple(HeldBudget(h.budget, h.amount, -1, "", h.limit, 0, None) for h in holds)
        return Settlement(rid, blind, 0, "cancelled")

    async def test_reserve_that_never_landed(self, ledger: Any) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        holds = [hold(a, 10, 4), hold(b, 10, 4)]
        await settle(ledger, await admit(ledger, hold(a, 10, 2)), 2)  # a has state, b has none
        out = await ledger.settle(self.release(new_reservation_id(), holds))
        assert out.outcomes == ("duplicate", "duplicate")
        assert (await usage(ledger, a, 10)).spent == 2
        ub = await usage(ledger, b, 10)
        assert (ub.spent, ub.held) == (0, 0)

    async def test_reserve_that_landed_is_released(self, ledger: Any) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        holds = [hold(a, 10, 4), hold(b, 10, 4)]
        rid = new_reservation_id()
        await admit(ledger, *holds, rid=rid)  # its reply "was lost"
        out = await ledger.settle(self.release(rid, holds))
        assert out.outcomes == ("applied", "applied")
        for x in (a, b):
            u = await usage(ledger, x, 10)
            assert (u.spent, u.held, u.holds) == (0, 0, 0)
        again = await ledger.settle(self.release(rid, holds))
        assert again.outcomes == ("duplicate", "duplicate")


# -- leases ---------------------------------------------------------------------------------------


class TestLeaseExpiry:
    async def test_expired_hold_is_purged_then_settled_late(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 100, 40), lease_ms=50)
        assert r.holds[0].remaining == 60
        u = await wait_purged(ledger, b)
        assert (u.held, u.holds, u.spent) == (0, 0, 0)
        late = await settle(ledger, r, 25)
        assert late.outcome == "late"
        u = await usage(ledger, b)
        assert (u.spent, u.held) == (25, 0)
        again = await settle(ledger, r, 25)
        assert again.outcome == "duplicate"
        assert (await usage(ledger, b)).spent == 25

    async def test_reserve_purges_expired_holds_and_reports_them(self, ledger: Any) -> None:
        b = budget()
        old = await admit(ledger, hold(b, 10, 10), lease_ms=50)

        async def probe() -> Reservation | Rejection:
            result = await reserve(ledger, hold(b, 10, 10))
            return result

        result = await eventually(probe, lambda res: res.admitted)
        assert isinstance(result, Reservation)
        assert result.purged == 1
        assert result.expired_ids == (old.id,)
        assert (await settle(ledger, old, 10)).outcome == "late"

    async def test_held_returns_to_zero_for_every_budget(self, ledger: Any) -> None:
        budgets = [budget("user"), budget("team", "r:t1")]
        for _ in range(3):
            await admit(ledger, *(hold(b, 100, 5) for b in budgets), lease_ms=50)
        for b in budgets:
            u = await wait_purged(ledger, b)
            assert (u.held, u.spent) == (0, 0)


class TestExtend:
    async def test_renews_a_live_hold(self, ledger: Any) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        r = await admit(ledger, hold(a, 100, 5), hold(b, 100, 5), lease_ms=300)
        renewed = await ledger.extend([r], LONG_LEASE_MS)
        assert renewed == Renewed(renewed=2, reheld=0, missing=0)
        # Past the original lease the hold is still there.
        await eventually(lambda: usage(ledger, a), lambda u: u.now_ms > r.now_ms + 400)
        u = await usage(ledger, a)
        assert (u.held, u.holds) == (5, 1)
        assert (await settle(ledger, r, 5)).outcome == "applied"

    async def test_reholds_a_tombstone(self, ledger: Any) -> None:
        b = budget()
        r = await admit(ledger, hold(b, 100, 30), lease_ms=50)
        await wait_purged(ledger, b)
        renewed = await ledger.extend([r], LONG_LEASE_MS)
        assert renewed == Renewed(renewed=0, reheld=1, missing=0)
        u = await usage(ledger, b)
        assert (u.held, u.holds) == (30, 1)
        # The tombstone is gone: this is an ordinary hold again.
        assert (await settle(ledger, r, 20)).outcome == "applied"
        u = await usage(ledger, b)
        assert (u.held, u.spent) == (0, 20)

    async def test_reports_missing_for_settled(self, ledger: Any) -> None:
        b = budget()
        live = await admit(ledger, hold(b, 100, 5))
        done = await admit(ledger, hold(b, 100, 5))
        await settle(ledger, done, 5)
        renewed = await ledger.extend([live, done], LONG_LEASE_MS)
        assert renewed == Renewed(renewed=1, reheld=0, missing=1)
        u = await usage(ledger, b)
        assert (u.held, u.spent) == (5, 5)

    async def test_extend_nothing(self, ledger: Any) -> None:
        assert await ledger.extend([], LONG_LEASE_MS) == Renewed()


# -- exactly once across time and lost state ---------------------------------------------------


class TestStale:
    async def test_a_settle_older_than_the_horizon_whose_hold_is_gone_is_stale(
        self, make_ledger: Any
    ) -> None:
        """Older on the ledger's clock: the reserve's time (``now_ms``) plus the horizon passed."""
        ledger = await make_ledger(horizon_ms=300)
        b = budget()
        r = await admit(ledger, hold(b, 100, 10), lease_ms=300)
        # The hold is there, so the settle applies, whatever its age.
        assert (await settle(ledger, r, 6)).outcome == "applied"
        await eventually(lambda: usage(ledger, b), lambda u: u.now_ms > r.now_ms + 300)
        again = await settle(ledger, r, 6)
        assert again.outcome == "stale"
        assert (await usage(ledger, b)).spent == 6

    async def test_young_id_is_duplicate_not_stale(self, make_ledger: Any) -> None:
        ledger = await make_ledger(horizon_ms=60_000)
        b = budget()
        r = await admit(ledger, hold(b, 100, 10))
        await settle(ledger, r, 6)
        assert (await settle(ledger, r, 6)).outcome == "duplicate"

    async def test_an_old_settle_after_lost_state_is_stale_not_recovered(self, make_ledger: Any) -> None:
        ledger = await make_ledger(horizon_ms=300)
        b = budget()
        r = await admit(ledger, hold(b, 100, 10), lease_ms=300)
        ledger = await make_ledger.wipe(ledger)
        await eventually(lambda: usage(ledger, b), lambda u: u.now_ms > r.now_ms + 300)
        assert (await settle(ledger, r, 6)).outcome == "stale"
        assert (await usage(ledger, b)).spent == 0


class TestRecovered:
    async def test_settle_after_lost_state_is_recovered_once(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, b = budget("user"), budget("team", "r:t1")
        r = await admit(ledger, hold(a, 100, 10), hold(b, 100, 10))
        ledger = await make_ledger.wipe(ledger)
        first = await settle(ledger, r, 7)
        assert first.outcomes == ("recovered", "recovered")
        assert first.outcome == "recovered"
        for x in (a, b):
            u = await usage(ledger, x)
            assert (u.spent, u.held) == (7, 0)
        second = await settle(ledger, r, 7)
        assert second.outcomes == ("duplicate", "duplicate")
        for x in (a, b):
            assert (await usage(ledger, x)).spent == 7

    async def test_new_epoch_after_lost_state(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        b = budget()
        before = await admit(ledger, hold(b, 100, 10))
        ledger = await make_ledger.wipe(ledger)
        after = await admit(ledger, hold(b, 100, 10))
        assert after.holds[0].epoch
        assert after.holds[0].epoch != before.holds[0].epoch
        # The old reservation's settle is recovered; the new one's is applied.
        assert (await settle(ledger, before, 4)).outcome == "recovered"
        assert (await settle(ledger, after, 5)).outcome == "applied"
        assert (await usage(ledger, b)).spent == 9

    async def test_outcome_reports_recovered_first(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        b = budget()
        r = await admit(ledger, hold(b, 100, 10))
        ledger = await make_ledger.wipe(ledger)
        mixed = Settled(r.id, ("duplicate", "applied", "recovered", "late"))
        assert mixed.outcome == "recovered"
        assert (await settle(ledger, r, 1)).outcome == "recovered"


# -- windows, limits, reset, usage ----------------------------------------------------------------


class TestWindows:
    async def test_spend_does_not_carry_into_the_next_window(self, ledger: Any) -> None:
        period = 300
        b = budget(period_ms=period)
        r = await admit(ledger, hold(b, 10, 10))
        window = r.holds[0].window
        assert window % period == 0
        assert r.holds[0].reset_ms == window + period
        await settle(ledger, r, 10)
        u = await usage(ledger, b, 10)
        if u.window == window:
            assert (u.spent, u.remaining) == (10, 0)
        nxt = await eventually(lambda: usage(ledger, b, 10), lambda u: u.window > window)
        assert nxt.window % period == 0
        assert nxt.reset_ms == nxt.window + period
        assert (nxt.spent, nxt.held, nxt.remaining) == (0, 0, 10)
        fresh = await admit(ledger, hold(b, 10, 10))
        assert fresh.holds[0].window > window

    async def test_late_settle_lands_in_the_reserves_window(self, ledger: Any) -> None:
        period = 300
        b = budget(period_ms=period)
        r = await admit(ledger, hold(b, 10, 4))
        window = r.holds[0].window
        await eventually(lambda: usage(ledger, b, 10), lambda u: u.window > window)
        assert (await settle(ledger, r, 4)).outcome == "applied"
        u = await usage(ledger, b, 10)
        assert u.window > window
        assert (u.spent, u.held) == (0, 0)  # charged to the old window, not this one

    async def test_windows_are_aligned_to_the_epoch(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        u = await usage(ledger, b)
        assert u.window % HOUR_MS == 0
        assert u.window <= u.now_ms < u.window + HOUR_MS
        assert u.reset_ms == u.window + HOUR_MS

    async def test_lifetime_window(self, ledger: Any) -> None:
        b = budget(period_ms=0)
        u = await usage(ledger, b)
        assert (u.window, u.reset_ms) == (0, None)
        r = await admit(ledger, hold(b, 10, 1))
        assert (r.holds[0].window, r.holds[0].reset_ms) == (0, None)


class TestLimitOverride:
    async def test_raise_lower_and_remove(self, ledger: Any) -> None:
        b = budget()
        other = budget(entity="r:bob")
        await ledger.set_limit(b, 20)
        assert (await usage(ledger, b, 10)).limit == 20
        assert (await usage(ledger, other, 10)).limit == 10  # per entity only
        r = await admit(ledger, hold(b, 10, 15))
        assert r.holds[0].limit == 20
        assert r.holds[0].remaining == 5
        await refuse(ledger, hold(other, 10, 15))

        await ledger.set_limit(b, 5)
        (v,) = (await refuse(ledger, hold(b, 10, 1))).violations
        assert (v.limit, v.held, v.remaining) == (5, 15, 0)

        await ledger.set_limit(b, None)
        u = await usage(ledger, b, 10)
        assert (u.limit, u.held) == (10, 15)
        await settle(ledger, r, 0)
        await admit(ledger, hold(b, 10, 10))
        await refuse(ledger, hold(b, 10, 1))

    async def test_remove_without_override_is_a_no_op(self, ledger: Any) -> None:
        b = budget()
        await ledger.set_limit(b, None)
        assert (await usage(ledger, b, 10)).limit == 10

    async def test_zero_limit_blocks_everything(self, ledger: Any) -> None:
        b = budget()
        await ledger.set_limit(b, 0)
        (v,) = (await refuse(ledger, hold(b, 100, 0))).violations
        assert (v.limit, v.remaining) == (0, 0)

    @pytest.mark.parametrize(
        "bad", [20.0, True, -1, 2**52 + 1, "20"], ids=["float", "bool", "negative", "huge", "str"]
    )
    async def test_what_is_not_an_int_of_micro_units_is_refused_and_changes_nothing(
        self, ledger: Any, bad: Any
    ) -> None:
        b = budget()
        await ledger.set_limit(b, 30)
        with pytest.raises(ValueError, match="limit"):
            await ledger.set_limit(b, bad)
        assert (await usage(ledger, b, 10)).limit == 30


class TestReset:
    async def test_clears_spent_in_the_current_window(self, ledger: Any) -> None:
        b = budget(period_ms=HOUR_MS)
        await settle(ledger, await admit(ledger, hold(b, 10, 10)), 10)
        other = budget(entity="r:bob")
        await settle(ledger, await admit(ledger, hold(other, 10, 3)), 3)
        await ledger.reset(b)
        u = await usage(ledger, b, 10)
        assert (u.spent, u.held, u.remaining) == (0, 0, 10)
        await admit(ledger, hold(b, 10, 10))
        assert (await usage(ledger, other, 10)).spent == 3  # another budget is untouched

    async def test_keeps_live_holds(self, ledger: Any) -> None:
        b = budget()
        await settle(ledger, await admit(ledger, hold(b, 10, 4)), 4)
        r = await admit(ledger, hold(b, 10, 5))
        await ledger.reset(b)
        u = await usage(ledger, b, 10)
        assert (u.spent, u.held, u.holds) == (0, 5, 1)
        assert (await settle(ledger, r, 5)).outcome == "applied"
        assert (await usage(ledger, b, 10)).spent == 5

    async def test_reset_of_unknown_budget(self, ledger: Any) -> None:
        b = budget(entity="r:nobody")
        await ledger.reset(b)
        u = await usage(ledger, b, 10)
        assert (u.spent, u.held, u.holds) == (0, 0, 0)


class TestUsage:
    async def test_unknown_budget(self, ledger: Any) -> None:
        b = budget(entity="r:nobody", period_ms=HOUR_MS)
        u = await usage(ledger, b, 42)
        assert (u.budget, u.limit, u.spent, u.held, u.holds, u.remaining) == (b, 42, 0, 0, 0, 42)

    async def test_counts_live_holds(self, ledger: Any) -> None:
        b = budget()
        rs = [await admit(ledger, hold(b, 100, n)) for n in (1, 2, 3)]
        u = await usage(ledger, b)
        assert (u.holds, u.held, u.remaining) == (3, 6, 94)
        await settle(ledger, rs[1], 2)
        u = await usage(ledger, b)
        assert (u.holds, u.held, u.spent, u.remaining) == (2, 4, 2, 94)

    async def test_purges_expired_holds(self, ledger: Any) -> None:
        b = budget()
        await admit(ledger, hold(b, 100, 5), lease_ms=50)
        live = await admit(ledger, hold(b, 100, 7))
        u = await eventually(lambda: usage(ledger, b), lambda u: u.holds == 1)
        assert u.held == 7
        await settle(ledger, live, 0)


class TestLeaseBounds:
    @pytest.mark.parametrize("lease_ms", [0, -1, 1_001])
    async def test_reserve_refuses_a_lease_outside_the_horizon(
        self, make_ledger: Any, lease_ms: int
    ) -> None:
        ledger = await make_ledger(horizon_ms=1_000)
        b = budget()
        with pytest.raises(ValueError, match="lease"):
            await reserve(ledger, hold(b, 100, 1), lease_ms=lease_ms)
        u = await usage(ledger, b)
        assert (u.held, u.holds) == (0, 0)

    @pytest.mark.parametrize("lease_ms", [0, 1_001])
    async def test_extend_refuses_a_lease_outside_the_horizon(
        self, make_ledger: Any, lease_ms: int
    ) -> None:
        ledger = await make_ledger(horizon_ms=1_000)
        r = await admit(ledger, hold(budget(), 100, 1), lease_ms=1_000)
        with pytest.raises(ValueError, match="lease"):
            await ledger.extend([r], lease_ms)

    async def test_short_lease_does_not_end_a_longer_hold(self, make_ledger: Any) -> None:
        """A write with a short lease re-arms the budget's key TTLs; a longer hold must survive it.

        With a 400 ms horizon, the hold of 20 has the longest lease allowed (400 ms) and another
        reserve a 20 ms lease. Each usage read is judged by the ledger's own clock (``now_ms``), so
        the checks do not depend on how fast the test runs: until its lease ends the long hold is
        there; after it, it is a tombstone that settles late (not recovered: its keys outlived it).
        """
        ledger = await make_ledger(horizon_ms=400)
        b = budget()
        long = await admit(ledger, hold(b, 100, 20), lease_ms=400)
        short = await admit(ledger, hold(b, 100, 1), lease_ms=20)
        long_end = long.now_ms + long.lease_ms
        short_end = short.now_ms + short.lease_ms
        deadline = time.monotonic() + 5
        while True:
            u = await usage(ledger, b)
            live = [amount for amount, end in ((20, long_end), (1, short_end)) if u.now_ms < end]
            assert (u.held, u.holds) == (sum(live), len(live)), (u, long_end, short_end)
            if not live:
                break
            assert time.monotonic() < deadline, "the leases never ended"
            await asyncio.sleep(0.02)
        assert (await settle(ledger, long, 20)).outcome == "late"
        assert (await settle(ledger, short, 1)).outcome == "late"
        assert (await usage(ledger, b)).spent == 21


@pytest.mark.memory
class TestMemoryLedgerIdleSweep:
    """The memory ledger forgets idle budgets, as Redis keys with TTLs vanish; not their spend."""

    async def test_idle_sweep_keeps_spend_of_the_current_window(self) -> None:
        week = 7 * 24 * HOUR_MS
        clock = [1_800_000_000_000 - 1_800_000_000_000 % week + HOUR_MS]
        ledger = MemoryLedger(horizon_ms=60_000, clock=lambda: clock[0])
        b = budget(period_ms=week)
        r = await admit(ledger, hold(b, 100, 40), rid=new_reservation_id(clock[0]))
        await settle(ledger, r, 40)
        clock[0] += 2 * 60_000  # idle for longer than the horizon, same week
        busy = budget(entity="r:busy", period_ms=week)
        for _ in range(10_000):  # enough operations to trigger the idle sweep
            other = await admit(ledger, hold(busy, 10**9, 0), rid=new_reservation_id(clock[0]))
            await settle(ledger, other, 0)
        u = await usage(ledger, b, 100)
        assert u.window == r.holds[0].window
        assert (u.spent, u.remaining) == (40, 60)
        await refuse(ledger, hold(b, 100, 61))


# -- invariants under concurrency -----------------------------------------------------------------


class TestInvariantsUnderConcurrency:
    TASKS = 200

    async def test_four_invariants(self, ledger: Any) -> None:
        rng = random.Random(20261128)
        budgets = {
            budget("user", "r:u1"): 40,
            budget("user", "r:u2"): 25,
            budget("team", "r:t1"): 60,
            budget("global", "r:all"): 90,
        }
        names = list(budgets)
        expected = dict.fromkeys(names, 0)
        outcomes: list[str] = []
        admitted = rejected = 0
        running = True
        samples = 0

        async def request(i: int) -> None:
            nonlocal admitted, rejected
            picked = rng.sample(names, rng.randint(1, 3))
            estimate = rng.randint(0, 12)
            actual = rng.randint(0, estimate)
            result = await ledger.reserve(
                new_reservation_id(),
                [HoldRequest(b, budgets[b], estimate) for b in picked],
                LONG_LEASE_MS,
            )
            if not result.admitted:
                rejected += 1
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.005)
            s = settlement(result, actual)
            if i % 5 == 0:  # a retried settle racing itself: counts once
                results = await asyncio.gather(ledger.settle(s), ledger.settle(s))
                got = sorted(r.outcome for r in results)
                assert got == ["applied", "duplicate"], got
                outcomes.append("applied")
            else:
                outcomes.append((await ledger.settle(s)).outcome)
            for b in picked:
                expected[b] += actual

        async def sampler() -> None:
            nonlocal samples
            while running:
                for b, limit in budgets.items():
                    u = await ledger.usage(b, limit)
                    assert u.spent + u.held <= limit, u  # invariant 1
                    samples += 1
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(request(i) for i in range(self.TASKS)))
        finally:
            running = False
            await watcher

        assert admitted + rejected == self.TASKS
        assert admitted >= 20, admitted
        assert rejected >= 20, rejected  # the limits are small: many requests are refused
        assert samples > 0
        assert set(outcomes) == {"applied"}
        for b, limit in budgets.items():
            u = await ledger.usage(b, limit)
            assert (u.held, u.holds) == (0, 0)  # invariant 2
            assert u.spent == expected[b]  # invariant 3 (and 4: the raced settles counted once)
            assert u.spent <= limit  # invariant 1: actual <= estimate never overspends
