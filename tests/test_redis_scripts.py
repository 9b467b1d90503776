"""The reserve and settle scripts against a real redis-server: reply shapes, argument checks, pass state.

Two kinds of tests:

- ``TestRegressions``: bad arguments are refused before any write (a script that fails keeps the
  writes it made), and a budget state made again gets a new epoch; each test's docstring says what
  broke without the check;
- the other classes pin down behaviour that matters: the flat reserve reply and the string settle
  reply, the purge pass state (``pa`` '0' while a pass is under way), the epoch made from the id of
  the reservation that made the budget, the stale check done in Lua from the reserve's time (or,
  for a settlement that does not carry it, the id's).

Raw script calls go through ``RedisLedger._eval`` (EVALSHA with the ledger's own scripts), so the
arguments reach Lua exactly as written here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    Rejection,
    Renewed,
    Reservation,
    Settlement,
    new_reservation_id,
)
from budget_middleware.ledger._types import admits, id_time_ms

DAY_MS = 86_400_000
LIMIT = 10**9
LONG_LEASE_MS = 60_000

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("redis", marks=pytest.mark.redis, id="redis")], indirect=True
)


# -- helpers --------------------------------------------------------------------------------------


def budget(entity: str = "r:alice", period_ms: int = DAY_MS, rule: str = "user") -> Budget:
    return Budget(rule, entity, period_ms)


def key(ledger: Any, b: Budget) -> str:
    return str(ledger.layout.key(b))


async def fields(ledger: Any, b: Budget) -> dict[str, str]:
    return dict(await ledger.client().hgetall(key(ledger, b)))


async def server_ms(ledger: Any) -> int:
    seconds, micros = await ledger.client().time()
    return int(seconds) * 1000 + int(micros) // 1000


async def until_server_past(ledger: Any, ms: int, within: float = 10.0) -> None:
    """Wait until Redis's clock is past ``ms`` (no bare sleeps: a deadline on a condition)."""
    deadline = time.monotonic() + within
    while await server_ms(ledger) <= ms:
        assert time.monotonic() < deadline, "the server clock did not pass the mark in time"
        await asyncio.sleep(0.005)


async def admit(
    ledger: Any, b: Budget, amount: int, lease_ms: int = LONG_LEASE_MS, rid: str | None = None
) -> Reservation:
    result = await ledger.reserve(rid or new_reservation_id(), [HoldRequest(b, LIMIT, amount)], lease_ms)
    assert isinstance(result, Reservation), result
    return result


async def expired_holds(ledger: Any, b: Budget, *amounts: int, lease_ms: int = 200) -> list[Reservation]:
    """Reservations on ``b`` made together, whose leases have passed (their holds not purged yet:
    they are made in one pipelined round trip, before the first of them is due)."""
    out = await asyncio.gather(*(admit(ledger, b, amount, lease_ms) for amount in amounts))
    await until_server_past(ledger, max(r.now_ms for r in out) + lease_ms)
    assert all(r.purged == 0 for r in out)
    return list(out)


async def expired_hold(ledger: Any, b: Budget, amount: int) -> Reservation:
    (r,) = await expired_holds(ledger, b, amount)
    return r


async def spent_now(ledger: Any, b: Budget) -> int:
    return (await ledger.usage(b, LIMIT)).spent


def made_by(epoch: str, rid: str) -> bool:
    """Whether ``epoch`` is that of a state made by reservation ``rid``: its id, then ':' and the
    server's TIME (seconds '.' microseconds)."""
    return epoch.startswith(rid + ":")


def settlement(r: Reservation, actual: int) -> Settlement:
    return Settlement(r.id, r.holds, actual, "completed", estimate=r.holds[0].amount)


# =================================================================================================
# Defects
# =================================================================================================


class TestRegressions:
    @pytest.mark.parametrize(
        "bad_row",
        [
            pytest.param([DAY_MS, LIMIT, -1], id="negative-amount"),
            pytest.param([DAY_MS, LIMIT, "1.5"], id="fractional-amount"),
            pytest.param([-5, LIMIT, 1], id="negative-period"),
            pytest.param([DAY_MS, "", 1], id="empty-limit"),
            pytest.param([DAY_MS, LIMIT, "x"], id="non-numeric-amount"),
        ],
    )
    async def test_a_reserve_with_a_bad_later_hold_writes_nothing(
        self, make_ledger: Any, bad_row: list[Any]
    ) -> None:
        """Every budget's arguments are checked before the first write. Were budget 2's bad argument
        found only after budget 1's purge step had run (HDEL of its expired holds, HINCRBY held),
        the tombstones, queued for the final HSET, would never be written: the expired hold would
        vanish and its late settle be taken for a duplicate, the spend lost.
        """
        ledger = await make_ledger()
        a, other = budget("r:a"), budget("r:t1", rule="team")
        r0 = await expired_hold(ledger, a, 5)
        before = await fields(ledger, a)
        args = [
            "h:" + new_reservation_id(),
            LONG_LEASE_MS,
            ledger.horizon_ms,
            DAY_MS,
            LIMIT,
            1,
            *bad_row,
        ]
        with pytest.raises(LedgerError):
            await ledger._eval("reserve", [key(ledger, a), key(ledger, other)], args)
        assert await fields(ledger, a) == before, "a refused script wrote to the first budget"
        out = await ledger.settle(settlement(r0, 5))
        assert out.outcomes[0] in ("applied", "late"), "the expired hold's spend was dropped"
        assert await spent_now(ledger, a) == 5

    async def test_the_public_reserve_with_a_negative_later_amount_keeps_the_late_spend(
        self, make_ledger: Any
    ) -> None:
        """The same through the public API: ``RedisLedger.reserve`` passes a negative amount on to the
        script, which alone checks it."""
        ledger = await make_ledger()
        a, other = budget("r:a"), budget("r:t1", rule="team")
        r0 = await expired_hold(ledger, a, 5)
        with pytest.raises(LedgerError):
            await ledger.reserve(
                new_reservation_id(), [HoldRequest(a, LIMIT, 1), HoldRequest(other, LIMIT, -1)], 1000
            )
        out = await ledger.settle(settlement(r0, 5))
        assert out.outcomes[0] in ("applied", "late"), "the expired hold's spend was dropped"
        assert await spent_now(ledger, a) == 5

    async def test_a_reserve_retried_after_the_state_was_lost_starts_a_new_epoch(
        self, make_ledger: Any
    ) -> None:
        """A new budget state's epoch is made from the id of the reservation that made it and the
        server's time to the microsecond. The id alone could repeat: R0 makes the state (its reply
        lost), R1 reserves under R0's epoch, Redis loses its state, the caller retries R0, which
        makes the state again. With the same epoch R1's settle would be taken for a duplicate and
        its spend lost; with a new one it is recovered. (The whole sequence can fit in one
        millisecond, so the millisecond alone would not do.)
        """
        ledger = await make_ledger()
        a = budget("r:a")
        r0 = await admit(ledger, a, 5)  # its reply "lost": the caller will retry it
        r1 = await admit(ledger, a, 7)
        assert r1.holds[0].epoch == r0.holds[0].epoch
        await ledger.client().flushall()  # a restart without persistence
        again = await ledger.reserve(r0.id, [HoldRequest(a, LIMIT, 5)], LONG_LEASE_MS)
        assert isinstance(again, Reservation)
        out = await ledger.settle(settlement(r1, 7))
        assert out.outcomes == ("recovered",), "R1's spend was dropped as a duplicate"
        assert await spent_now(ledger, a) == 7
        assert again.holds[0].epoch != r1.holds[0].epoch

    @pytest.mark.parametrize(
        ("actual", "reserved"),
        [
            pytest.param("5.0", "0", id="actual-5.0"),
            pytest.param("5e0", "0", id="actual-exponent"),
            pytest.param(" 5", "0", id="actual-leading-space"),
            pytest.param("1" + "0" * 25, "0", id="actual-out-of-range"),
            pytest.param("5", "-1", id="reserved-negative"),
            pytest.param("5", "x", id="reserved-not-a-number"),
            pytest.param("5", "nan", id="reserved-nan"),
        ],
    )
    async def test_a_settle_with_a_non_canonical_integer_writes_nothing(
        self, make_ledger: Any, actual: str, reserved: str
    ) -> None:
        """The actual cost goes to HINCRBY as the caller wrote it, and HINCRBY takes only integers
        as Redis writes them, while Lua reads '5.0', '5e0' and ' 5' as 5. Were such a value found
        only by the HINCRBY, after the HDEL of the hold, the spend would never be added. The
        reserve's time must be a number too.
        """
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        hb = r.holds[0]
        args = ["h:" + r.id, actual, ledger.horizon_ms, f"s:{hb.window}", hb.epoch, DAY_MS, reserved]
        try:
            await ledger._eval("settle", [key(ledger, a)], args)
        except LedgerError:
            # Refused: then it must have written nothing, and the proper settle applies.
            assert "h:" + r.id in await fields(ledger, a), "a refused settle removed the hold"
        await ledger.settle(settlement(r, 5))
        u = await ledger.usage(a, LIMIT)
        assert (u.spent, u.held) == (5, 0)

    @pytest.mark.parametrize("spent_field", ["s:x", "s:", "held", "s:1.5"])
    async def test_a_settle_refuses_a_spent_field_that_is_not_a_window(
        self, make_ledger: Any, spent_field: str
    ) -> None:
        """The spent field comes ready-made from the caller: anything but ``s:<integer>`` (or '' for a
        release) is refused, and the hold kept. An ``s:x`` field would make every later purge step
        of the budget fail.
        """
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        hb = r.holds[0]
        args = ["h:" + r.id, 5, ledger.horizon_ms, spent_field, hb.epoch, DAY_MS, 0]
        with pytest.raises(LedgerError):
            await ledger._eval("settle", [key(ledger, a)], args)
        assert "h:" + r.id in await fields(ledger, a)

    @pytest.mark.parametrize("field", ["held", "epoch", "s:0", "x"])
    async def test_a_hold_field_that_is_not_a_hold_is_refused(
        self, make_ledger: Any, field: str
    ) -> None:
        """The hold's field comes ready-made from the caller: a reserve or settle given another
        field of the hash (``held``, ``epoch``, a window) would overwrite or delete it."""
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        before = await fields(ledger, a)
        with pytest.raises(LedgerError):
            await ledger._eval(
                "reserve", [key(ledger, a)], [field, 1000, ledger.horizon_ms, DAY_MS, LIMIT, 5]
            )
        hb = r.holds[0]
        with pytest.raises(LedgerError):
            await ledger._eval(
                "settle",
                [key(ledger, a)],
                [field, 5, ledger.horizon_ms, f"s:{hb.window}", hb.epoch, DAY_MS, 0],
            )
        assert await fields(ledger, a) == before

    async def test_a_settle_checks_the_horizon_before_settling_any_budget(
        self, make_ledger: Any
    ) -> None:
        """The horizon is checked up front, not where a fallback path first reads it: a bad one must
        not leave a multi-budget settle half done."""
        ledger = await make_ledger()
        a, lost = budget("r:a"), budget("r:t1", rule="team")
        r = await ledger.reserve(
            new_reservation_id(), [HoldRequest(a, LIMIT, 5), HoldRequest(lost, LIMIT, 5)], 1000
        )
        assert isinstance(r, Reservation)
        await ledger.client().delete(key(ledger, lost))  # that budget's state is gone
        ha, hl = r.holds
        args = [
            "h:" + r.id,
            5,
            "",
            f"s:{ha.window}",
            ha.epoch,
            DAY_MS,
            ha.reserved_ms,
            f"s:{hl.window}",
            hl.epoch,
            DAY_MS,
            hl.reserved_ms,
        ]
        with pytest.raises(LedgerError):
            await ledger._eval("settle", [key(ledger, a), key(ledger, lost)], args)
        assert "h:" + r.id in await fields(ledger, a), "a failed settle settled the first budget"

    async def test_a_retried_reserve_that_finds_only_some_of_its_holds_counts_none_twice(
        self, make_ledger: Any
    ) -> None:
        """A reserve retried after one budget lost its state (say a Cluster node restarted empty)
        finds its hold on the other budget only. It is a replay there: were it admitted again, the
        hold found would be written anew and its amount added to ``held`` a second time, which no
        settle takes back.
        """
        ledger = await make_ledger()
        a, b = budget("r:a"), budget("r:t1", rule="team")
        rid = new_reservation_id()
        holds = [HoldRequest(a, LIMIT, 300), HoldRequest(b, LIMIT, 500)]
        assert isinstance(await ledger.reserve(rid, holds, LONG_LEASE_MS), Reservation)
        await ledger.client().delete(key(ledger, a))  # a's state is lost
        again = await ledger.reserve(rid, holds, LONG_LEASE_MS)
        assert isinstance(again, Reservation)
        assert again.replayed
        state = await fields(ledger, b)
        hold_amounts = [int(v.split(":")[1]) for k, v in state.items() if k.startswith("h:")]
        assert int(state["held"]) == sum(hold_amounts) == 500
        settled = await ledger.settle(Settlement(rid, again.holds, 700, "completed"))
        assert settled.outcomes[1] == "applied"
        assert int((await fields(ledger, b))["held"]) == 0

    @pytest.mark.parametrize(
        ("lease", "horizon"),
        [
            pytest.param(1000, "nan", id="nan-horizon"),
            pytest.param(1000, "inf", id="inf-horizon"),
            pytest.param("inf", DAY_MS, id="inf-lease"),
            pytest.param("nan", DAY_MS, id="nan-lease"),
        ],
    )
    async def test_a_reserve_refuses_a_lease_or_horizon_that_is_not_finite(
        self, make_ledger: Any, lease: Any, horizon: Any
    ) -> None:
        """'nan' and 'inf' are numbers to Lua, and pass a ``< 0`` check; a TTL armed at
        ``string.format('%d', inf)`` (-2^63) would make PEXPIREAT delete the budget, spend and all,
        while the reserve answered "admitted". Both are refused.
        """
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        await ledger.settle(settlement(r, 5))
        args = ["h:" + new_reservation_id(), lease, horizon, DAY_MS, LIMIT, 1]
        try:
            await ledger._eval("reserve", [key(ledger, a)], args)
        except LedgerError:
            pass
        assert await spent_now(ledger, a) == 5, "the budget's spend was deleted"


# =================================================================================================
# Reply shapes
# =================================================================================================


class TestReplyShapes:
    async def test_an_admitted_reserve_of_one_budget(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        rid = new_reservation_id()
        reply = await ledger._eval(
            "reserve", [key(ledger, a)], ["h:" + rid, 1000, DAY_MS, DAY_MS, 100, 30]
        )
        assert len(reply) == 6
        assert reply[0] == 1
        assert reply[2] == 0
        assert made_by(reply[3], rid)
        assert reply[4:] == [100, 70]
        now = reply[1]
        assert abs(now - await server_ms(ledger)) < 5_000

    async def test_an_admitted_reserve_of_two_budgets_and_its_replay(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, t = budget("r:a"), budget("r:t1", rule="team", period_ms=0)
        await admit(ledger, t, 4)  # t has a state already: its epoch is that reservation's id
        epoch_t = (await fields(ledger, t))["epoch"]
        rid = new_reservation_id()
        keys = [key(ledger, a), key(ledger, t)]
        args = ["h:" + rid, 1000, DAY_MS, DAY_MS, 100, 30, 0, 50, 10]
        first = await ledger._eval("reserve", keys, args)
        assert first[0] == 1
        assert first[2] == 0
        assert made_by(first[3], rid)
        assert first[3:] == [first[3], 100, 70, epoch_t, 50, 36]
        again = await ledger._eval("reserve", keys, args)
        assert again[0] == 2
        assert again[3:] == [first[3], 100, 70, epoch_t, 50, 36]  # counts its own hold as held
        assert int((await fields(ledger, a))["held"]) == 30

    async def test_a_rejected_reserve(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, t = budget("r:a"), budget("r:t1", rule="team")
        await admit(ledger, a, 60)
        keys = [key(ledger, a), key(ledger, t)]
        reply = await ledger._eval(
            "reserve",
            keys,
            ["h:" + new_reservation_id(), 1000, DAY_MS, DAY_MS, LIMIT, 1, DAY_MS, 50, 51],
        )
        assert reply[0] == 0
        assert reply[2] == 0
        assert reply[3:] == [LIMIT, 0, 60, 1, 50, 0, 0, 0]
        assert await fields(ledger, t) == {}  # an unknown budget stays unwritten

    async def test_expired_ids_come_before_the_rows(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r0, r1 = await expired_holds(ledger, a, 5, 6)
        rid = new_reservation_id()
        reply = await ledger._eval(
            "reserve", [key(ledger, a)], ["h:" + rid, 1000, DAY_MS, DAY_MS, 100, 30]
        )
        assert reply[0] == 1
        assert reply[2] == 2
        assert sorted(reply[3:5]) == sorted([r0.id, r1.id])
        epoch = (await fields(ledger, a))["epoch"]
        assert made_by(epoch, r0.id) or made_by(epoch, r1.id)  # the one that made the state
        assert reply[5:] == [epoch, 100, 70]

    async def test_the_ledger_parses_every_reserve_shape(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, t = budget("r:a"), budget("r:t1", rule="team", period_ms=3_600_000)
        r0 = await expired_hold(ledger, a, 5)
        holds = [HoldRequest(a, 100, 30), HoldRequest(t, 50, 10)]
        r = await ledger.reserve(new_reservation_id(), holds, 1000)
        assert isinstance(r, Reservation)
        assert not r.replayed
        assert r.purged == 1
        assert r.expired_ids == (r0.id,)
        assert [hb.window for hb in r.holds] == [a.window_of(r.now_ms), t.window_of(r.now_ms)]
        assert [hb.reset_ms for hb in r.holds] == [
            a.window_of(r.now_ms) + DAY_MS,
            t.window_of(r.now_ms) + 3_600_000,
        ]
        assert made_by(r.holds[0].epoch, r0.id)
        assert made_by(r.holds[1].epoch, r.id)
        assert [(hb.limit, hb.remaining) for hb in r.holds] == [(100, 70), (50, 40)]
        replay = await ledger.reserve(r.id, holds, 1000)
        assert isinstance(replay, Reservation)
        assert replay.replayed
        assert [hb.epoch for hb in replay.holds] == [hb.epoch for hb in r.holds]
        refused = await ledger.reserve(new_reservation_id(), [HoldRequest(a, 100, 71)], 1000)
        assert isinstance(refused, Rejection)
        (v,) = refused.violations
        assert (v.limit, v.spent, v.held, v.amount) == (100, 0, 30, 71)
        assert v.reset_ms == a.window_of(v.now_ms) + DAY_MS

    async def test_a_settle_replies_one_string(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, t = budget("r:a"), budget("r:t1", rule="team")
        r = await ledger.reserve(
            new_reservation_id(), [HoldRequest(a, LIMIT, 5), HoldRequest(t, LIMIT, 5)], 1000
        )
        assert isinstance(r, Reservation)
        one = Settlement(r.id, r.holds[:1], 3, "completed")
        call = ledger._settle_call(one)
        assert call[2] == [
            "h:" + r.id,
            3,
            ledger.horizon_ms,
            f"s:{r.holds[0].window}",
            r.holds[0].epoch,
            DAY_MS,
            r.now_ms,
        ]
        assert await ledger._eval(*call) == "applied"
        both = ledger._settle_call(Settlement(r.id, r.holds, 3, "completed"))
        assert await ledger._eval(*both) == "duplicate applied"
        assert (await ledger.settle(Settlement(r.id, r.holds, 3, "completed"))).outcomes == (
            "duplicate",
            "duplicate",
        )

    async def test_a_release_call_has_an_empty_spent_field(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        blind = HeldBudget(a, 5, -1, "", LIMIT, 0, None)
        call = ledger._settle_call(Settlement(r.id, (blind,), 0, "release-unavailable"))
        assert call[2][3:] == ["", "", DAY_MS, 0]
        assert (await ledger.settle(Settlement(r.id, (blind,), 0, "release"))).outcomes == ("applied",)
        assert (await ledger.settle(Settlement(r.id, (blind,), 0, "release"))).outcomes == ("duplicate",)
        assert int((await fields(ledger, a))["held"]) == 0


# =================================================================================================
# Settle paths
# =================================================================================================


class TestSettlePaths:
    async def test_a_release_with_actual_is_refused_before_writing(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a, t = budget("r:a"), budget("r:t1", rule="team")
        r = await ledger.reserve(
            new_reservation_id(), [HoldRequest(a, LIMIT, 5), HoldRequest(t, LIMIT, 5)], 1000
        )
        assert isinstance(r, Reservation)
        hb = r.holds[0]
        keys = [key(ledger, a), key(ledger, t)]
        args = [
            "h:" + r.id,
            3,
            ledger.horizon_ms,
            f"s:{hb.window}",
            hb.epoch,
            DAY_MS,
            hb.reserved_ms,
            "",
            "",
            DAY_MS,
            0,
        ]
        with pytest.raises(LedgerError):
            await ledger._eval("settle", keys, args)
        assert "h:" + r.id in await fields(ledger, a)
        assert "h:" + r.id in await fields(ledger, t)

    async def test_late_then_duplicate_and_a_late_release(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r0, r1 = await expired_holds(ledger, a, 5, 6)
        purger = await admit(ledger, a, 0)
        assert set(purger.expired_ids) == {r0.id, r1.id}
        f = await fields(ledger, a)
        assert "t:" + r0.id in f
        assert "t:" + r1.id in f
        assert int(f["held"]) == 0
        assert (await ledger.settle(settlement(r0, 4))).outcomes == ("late",)
        assert (await ledger.settle(settlement(r0, 4))).outcomes == ("duplicate",)
        blind = HeldBudget(a, 6, -1, "", LIMIT, 0, None)
        assert (await ledger.settle(Settlement(r1.id, (blind,), 0, "release"))).outcomes == ("late",)
        assert (await ledger.settle(settlement(r1, 6))).outcomes == ("duplicate",)
        assert await spent_now(ledger, a) == 4

    async def test_a_tombstone_keeps_the_amount_of_its_hold(self, make_ledger: Any) -> None:
        """``t:<id>`` is '<purge time>:<amount>': a renewal holds it again with that amount."""
        ledger = await make_ledger()
        a = budget("r:a")
        r = await expired_hold(ledger, a, 5)
        purger = await admit(ledger, a, 0)
        assert purger.expired_ids == (r.id,)
        assert (await fields(ledger, a))["t:" + r.id] == f"{purger.now_ms}:5"

    async def test_a_tombstone_of_an_older_version_is_left_for_its_settle(
        self, make_ledger: Any
    ) -> None:
        """A tombstone written before tombstones carried their amount ('<purge time>') cannot be
        held again: the renewal counts it missing and leaves it, so the settle still finds it late;
        and the purge still sweeps it after the horizon."""
        ledger = await make_ledger(horizon_ms=60_000)
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        now = await server_ms(ledger)
        await ledger.client().hdel(key(ledger, a), "h:" + r.id)
        await ledger.client().hincrby(key(ledger, a), "held", -5)
        await ledger.client().hset(key(ledger, a), "t:" + r.id, str(now))
        assert await ledger.extend([r], LONG_LEASE_MS) == Renewed(missing=1)
        assert int((await fields(ledger, a))["held"]) == 0
        assert (await ledger.settle(settlement(r, 4))).outcomes == ("late",)
        assert await spent_now(ledger, a) == 4
        await ledger.client().hset(key(ledger, a), mapping={"t:old": str(now - 61_000), "pa": "1"})
        await ledger.usage(a, LIMIT)
        assert "t:old" not in await fields(ledger, a)

    async def test_recovered_after_a_flush_then_duplicate(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 5)
        await ledger.client().flushall()
        assert (await ledger.settle(settlement(r, 4))).outcomes == ("recovered",)
        f = await fields(ledger, a)
        assert "d:" + r.id in f
        assert "epoch" not in f
        assert int(f["pa"]) > 0
        assert int(await ledger.client().pttl(key(ledger, a))) > 0
        assert (await ledger.settle(settlement(r, 4))).outcomes == ("duplicate",)
        assert await spent_now(ledger, a) == 4
        later = await admit(ledger, a, 1)
        assert made_by(later.holds[0].epoch, later.id)  # the next reserve starts a new epoch

    @pytest.mark.parametrize(
        "rid",
        [
            pytest.param("0" * 32, id="zero-time"),
            pytest.param(new_reservation_id().upper(), id="upper-case-hex"),
            pytest.param(new_reservation_id()[:31], id="31-chars"),
            pytest.param(new_reservation_id() + "0", id="33-chars"),
            pytest.param("request-1", id="foreign"),
            pytest.param("zz" + new_reservation_id()[2:], id="not-hex"),
        ],
    )
    async def test_an_id_that_is_not_ours_or_too_old_is_stale(self, make_ledger: Any, rid: str) -> None:
        """The creation time is read from the id in Lua: it must agree with ``id_time_ms``."""
        ledger = await make_ledger()
        a = budget("r:a")
        await admit(ledger, a, 1)
        window = a.window_of(await server_ms(ledger))
        assert id_time_ms(rid) < await server_ms(ledger) - ledger.horizon_ms
        hb = HeldBudget(a, 1, window, "another-epoch", LIMIT, 0, None)
        assert (await ledger.settle(Settlement(rid, (hb,), 3, "completed"))).outcomes == ("stale",)
        assert await spent_now(ledger, a) == 0

    async def test_an_id_just_inside_and_just_outside_the_horizon(self, make_ledger: Any) -> None:
        ledger = await make_ledger(horizon_ms=60_000)
        a = budget("r:a")
        await admit(ledger, a, 1, lease_ms=1000)
        now = await server_ms(ledger)
        window = a.window_of(now)
        hb = HeldBudget(a, 1, window, "another-epoch", LIMIT, 0, None)
        fresh = new_reservation_id(now - 50_000)
        old = new_reservation_id(now - 70_000)
        assert (await ledger.settle(Settlement(fresh, (hb,), 3, "completed"))).outcomes == ("recovered",)
        assert (await ledger.settle(Settlement(old, (hb,), 3, "completed"))).outcomes == ("stale",)
        same_epoch = HeldBudget(a, 1, window, (await fields(ledger, a))["epoch"], LIMIT, 0, None)
        assert (await ledger.settle(Settlement(old, (same_epoch,), 3, "x"))).outcomes == ("stale",)
        fresh2 = new_reservation_id(now - 50_000)
        assert (await ledger.settle(Settlement(fresh2, (same_epoch,), 3, "x"))).outcomes == (
            "duplicate",
        )
        assert await spent_now(ledger, a) == 3

    async def test_a_lifetime_budget_is_kept_from_its_first_spend(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        life = budget("r:a", period_ms=0)
        r = await admit(ledger, life, 5, lease_ms=1000)
        assert r.holds[0].window == 0
        assert int(await ledger.client().pttl(key(ledger, life))) > 0
        assert (await ledger.settle(settlement(r, 5))).outcomes == ("applied",)
        f = await fields(ledger, life)
        assert f["ttl"] == "-1"
        assert f["s:0"] == "5"
        assert int(await ledger.client().pttl(key(ledger, life))) == -1


# =================================================================================================
# Purge pass state
# =================================================================================================


class TestPassState:
    async def _many_expired(self, ledger: Any, b: Budget, count: int) -> list[Reservation]:
        client = ledger.client()
        await client.config_set("hash-max-listpack-entries", 8)  # a hash table: HSCAN pages
        return await expired_holds(ledger, b, *([1] * count), lease_ms=1000)

    @pytest.fixture
    async def listpack_entries(self, make_ledger: Any) -> Any:
        ledger = await make_ledger()
        client = ledger.client()
        entries = (await client.config_get("hash-max-listpack-entries"))["hash-max-listpack-entries"]
        try:
            yield ledger
        finally:
            await client.config_set("hash-max-listpack-entries", entries)

    async def test_pa_is_zero_while_a_pass_is_under_way(self, listpack_entries: Any) -> None:
        ledger = listpack_entries
        a = budget("r:a")
        held = await self._many_expired(ledger, a, 300)
        steps = 0
        seen_under_way = False
        purged: set[str] = set()
        deadline = time.monotonic() + 10
        while True:
            r = await admit(ledger, a, 0, lease_ms=LONG_LEASE_MS)
            purged |= set(r.expired_ids)
            steps += 1
            f = await fields(ledger, a)
            if f["pa"] == "0":
                seen_under_way = True
                assert "pc" in f
                assert f["pc"] != "0"
                assert "pm" in f
                assert int(f["pm"]) <= r.now_ms + LONG_LEASE_MS  # the new hold is due by then
            else:
                assert "pc" not in f
                assert "pm" not in f
                assert int(f["pa"]) > r.now_ms
                break
            assert time.monotonic() < deadline
        assert seen_under_way
        assert steps > 1
        assert purged == {x.id for x in held}
        f = await fields(ledger, a)
        assert not any(k.startswith("h:") and int(v.split(":")[0]) <= r.now_ms for k, v in f.items())
        assert int(f["held"]) == 0
        # The next pass is due no later than the first thing left to sweep.
        assert int(f["pa"]) <= min(
            [int(v.split(":")[0]) for k, v in f.items() if k.startswith("h:")]
            + [int(v.split(":")[0]) + ledger.horizon_ms for k, v in f.items() if k.startswith("t:")]
        )

    async def test_a_renewal_during_a_pass_reholds_and_moves_pm(self, listpack_entries: Any) -> None:
        ledger = listpack_entries
        a = budget("r:a")
        held = {r.id: r for r in await self._many_expired(ledger, a, 300)}
        first = await admit(ledger, a, 0, lease_ms=LONG_LEASE_MS)
        f = await fields(ledger, a)
        assert f["pa"] == "0", "the pass should take several steps"
        victim = held[first.expired_ids[0]]
        assert "t:" + victim.id in f
        renewed = await ledger.extend([victim], 500)
        assert (renewed.renewed, renewed.reheld, renewed.missing) == (0, 1, 0)
        g = await fields(ledger, a)
        assert g["pa"] == "0"
        assert "t:" + victim.id not in g
        expiry = int(g["h:" + victim.id].split(":")[0])
        assert int(g["pm"]) <= expiry
        assert int(g["held"]) == int(f["held"]) + 1
        # Finish the pass with reserves: the re-held hold is swept again once its new lease ends.
        await until_server_past(ledger, expiry)
        deadline = time.monotonic() + 10
        while "h:" + victim.id in await fields(ledger, a):
            await admit(ledger, a, 0, lease_ms=LONG_LEASE_MS)
            assert time.monotonic() < deadline
        assert (await ledger.settle(settlement(victim, 1))).outcomes == ("late",)

    async def test_usage_completes_a_pass_under_way(self, listpack_entries: Any) -> None:
        ledger = listpack_entries
        a = budget("r:a")
        await self._many_expired(ledger, a, 300)
        await admit(ledger, a, 0, lease_ms=LONG_LEASE_MS)
        assert (await fields(ledger, a))["pa"] == "0"
        u = await ledger.usage(a, LIMIT)
        assert u.held == 0
        assert u.holds == 1
        f = await fields(ledger, a)
        assert f["pa"] != "0"
        assert "pc" not in f
        assert "pm" not in f
        assert int(f["pa"]) <= int(next(v for k, v in f.items() if k.startswith("h:")).split(":")[0])

    async def test_a_rejected_reserve_still_takes_its_purge_step(self, listpack_entries: Any) -> None:
        ledger = listpack_entries
        a = budget("r:a")
        held = await self._many_expired(ledger, a, 300)
        refused = await ledger.reserve(new_reservation_id(), [HoldRequest(a, 0, 1)], 1000)
        assert isinstance(refused, Rejection)
        assert refused.purged > 0
        f = await fields(ledger, a)
        assert f["pa"] == "0"
        assert all("t:" + i in f and "h:" + i not in f for i in refused.expired_ids)
        assert int(f["held"]) == len(held) - refused.purged

    async def test_a_clock_behind_pa_leaves_the_pass_alone(self, make_ledger: Any) -> None:
        """With ``pa`` in the future (the clock stepped back, or nothing due), a reserve reads no
        pass state and writes none. (A lifetime budget: a daily one's first reserve of a window
        within a lease of midnight brings ``pa`` forward to the window's end.)"""
        ledger = await make_ledger()
        a = budget("r:a", period_ms=0)
        await admit(ledger, a, 1)
        pa = await server_ms(ledger) + LONG_LEASE_MS // 2  # before the next hold's expiry
        await ledger.client().hset(key(ledger, a), mapping={"pa": str(pa)})
        before = await fields(ledger, a)
        r = await admit(ledger, a, 1)
        after = await fields(ledger, a)
        assert after["pa"] == before["pa"]
        assert "pc" not in after
        assert r.purged == 0


# =================================================================================================
# Epoch
# =================================================================================================


async def big_budget(ledger: Any, b: Budget, expired: int, live: int) -> int:
    """Write ``b``'s hash by hand: ``expired`` holds whose lease has passed and ``live`` holds with
    a long one, 1 micro-unit each, and a purge pass due. Returns the server's time."""
    now = await server_ms(ledger)
    k = key(ledger, b)
    holds = {f"h:{new_reservation_id()}": f"{now - 1000}:1" for _ in range(expired)}
    holds |= {f"h:{new_reservation_id()}": f"{now + DAY_MS}:1" for _ in range(live)}
    items = list(holds.items())
    async with ledger.client().pipeline(transaction=False) as pipe:
        for i in range(0, len(items), 1000):
            pipe.hset(k, mapping=dict(items[i : i + 1000]))
        pipe.hset(
            k,
            mapping={"held": expired + live, "epoch": "e", "ttl": now + 2 * DAY_MS, "pa": 1},
        )
        pipe.pexpireat(k, now + 2 * DAY_MS)
        await pipe.execute()
    return now


class TestUsageIsBounded:
    """usage.lua does a bounded batch per call (it ran a whole purge pass, 437 ms of Redis time on
    a budget of 200k fields); ``usage`` makes as many calls as the budget needs."""

    EXPIRED, LIVE = 6000, 4000
    # HSCAN's COUNT is a hint: a step may see a few more fields than the batch (64, or 256 for the
    # count), never thousands.
    STEP_BOUND = 200
    COUNT_BOUND = 600

    async def test_one_call_purges_one_batch(self, make_ledger: Any) -> None:
        """Failed before: the one call purged all 6000 expired holds."""
        ledger = await make_ledger()
        a = budget("r:big")
        await big_budget(ledger, a, self.EXPIRED, self.LIVE)
        reply = await ledger._eval("usage", [key(ledger, a)], [DAY_MS, LIMIT, DAY_MS, ""])
        assert len(reply) == 9
        _, _, _, _, held, purged, under_way, live, cursor = reply
        assert 0 < purged <= self.STEP_BOUND
        assert held == self.EXPIRED + self.LIVE - purged
        assert (under_way, live, cursor) == (1, 0, "")
        f = await fields(ledger, a)
        assert (f["pa"], int(f["held"])) == ("0", held)

    async def test_one_call_counts_one_batch(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:big")
        await big_budget(ledger, a, 0, self.LIVE)
        reply = await ledger._eval("usage", [key(ledger, a)], [DAY_MS, LIMIT, DAY_MS, "0"])
        *_, live, cursor = reply
        assert 0 < live <= self.COUNT_BOUND
        assert cursor != "0"

    async def test_usage_sums_bounded_calls(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:big")
        stamp = await big_budget(ledger, a, self.EXPIRED, self.LIVE)
        replies: list[Any] = []
        script_call = ledger._eval

        async def recorded(name: str, keys: list[str], args: list[Any]) -> Any:
            reply = await script_call(name, keys, args)
            replies.append(reply)
            return reply

        ledger._eval = recorded
        u = await ledger.usage(a, LIMIT)
        assert (u.held, u.holds, u.purged) == (self.LIVE, self.LIVE, self.EXPIRED)
        assert len(replies) > self.EXPIRED // self.STEP_BOUND
        assert max(r[5] for r in replies) <= self.STEP_BOUND
        assert max(r[7] for r in replies) <= self.COUNT_BOUND
        f = await fields(ledger, a)
        assert f["pa"] != "0", "usage runs the pass under way to its end"
        assert not [k for k, v in f.items() if k.startswith("h:") and v == f"{stamp - 1000}:1"]

    @pytest.mark.parametrize(
        "cursor", [pytest.param("x", id="not-a-cursor"), pytest.param("-1", id="negative")]
    )
    async def test_a_bad_cursor_is_refused(self, make_ledger: Any, cursor: str) -> None:
        ledger = await make_ledger()
        with pytest.raises(LedgerError, match="usage: bad arguments"):
            await ledger._eval("usage", [key(ledger, budget())], [DAY_MS, LIMIT, DAY_MS, cursor])


class TestTheAdmissionRule:
    """``admits`` (Python, used where the Cluster reads later slots) and reserve.lua, on both its
    paths, agree: room left, and room for the whole amount."""

    @pytest.mark.parametrize(
        ("limit", "spent", "held", "amount"),
        [(10, 10, 0, 0), (10, 9, 0, 1), (10, 9, 0, 2), (10, 0, 10, 0), (0, 0, 0, 0), (10, 5, 4, 1)],
    )
    @pytest.mark.parametrize("path", ["common", "general"])
    async def test_python_and_lua_agree(
        self, make_ledger: Any, path: str, limit: int, spent: int, held: int, amount: int
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a", period_ms=0)
        state = {"held": held, "s:0": spent, "epoch": "e", "ttl": -1}
        if path == "general":
            state["pa"] = 0  # a purge pass under way: the general path
        await ledger.client().hset(key(ledger, a), mapping=state)
        result = await ledger.reserve(new_reservation_id(), [HoldRequest(a, limit, amount)], 1000)
        assert result.admitted is admits(limit, spent, held, amount)


class TestEpoch:
    async def test_the_epoch_is_the_id_of_the_reservation_that_made_the_state(
        self, make_ledger: Any
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r0 = await admit(ledger, a, 1)
        r1 = await admit(ledger, a, 1)
        assert r0.holds[0].epoch == r1.holds[0].epoch == (await fields(ledger, a))["epoch"]
        assert made_by(r0.holds[0].epoch, r0.id)

    async def test_a_state_made_again_after_a_flush_has_another_epoch(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r0 = await admit(ledger, a, 1)
        await ledger.client().flushall()
        r1 = await admit(ledger, a, 1)
        assert made_by(r1.holds[0].epoch, r1.id)
        assert r1.holds[0].epoch != r0.holds[0].epoch
        assert (await ledger.settle(settlement(r0, 2))).outcomes == ("recovered",)
        assert (await ledger.settle(settlement(r1, 3))).outcomes == ("applied",)
        assert await spent_now(ledger, a) == 5

    async def test_an_expired_hash_made_again_has_another_epoch(self, make_ledger: Any) -> None:
        ledger = await make_ledger(horizon_ms=200)
        a = budget("r:a", period_ms=100)
        r0 = await admit(ledger, a, 1, lease_ms=100)
        assert (await ledger.settle(settlement(r0, 1))).outcomes == ("applied",)
        deadline = time.monotonic() + 10
        while await ledger.client().exists(key(ledger, a)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        r1 = await admit(ledger, a, 1, lease_ms=100)
        assert made_by(r1.holds[0].epoch, r1.id)
        # r0 is settled and older than the horizon: whatever epoch it carries, it changes nothing.
        assert (await ledger.settle(settlement(r0, 1))).outcomes == ("stale",)


# =================================================================================================
# One budget's common case (served before the general path)
# =================================================================================================


class TestOneBudgetCommonCase:
    """A reserve of one budget whose state exists, with no purge pass due and not a retry, and a
    settle of one budget whose hold is there, return before the general path: they must still do
    everything the general path would."""

    async def test_a_rejection_writes_nothing(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        await admit(ledger, a, 60)
        before = await fields(ledger, a)
        reply = await ledger._eval(
            "reserve", [key(ledger, a)], ["h:" + new_reservation_id(), 1000, DAY_MS, DAY_MS, 100, 41]
        )
        status, _, _, override, held, spent, epoch = reply.split(" ", 6)
        assert (status, epoch, override, held, spent) == ("0", before["epoch"], "-", "60", "0")
        assert await fields(ledger, a) == before

    async def test_the_reply_is_what_was_read(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        first = await admit(ledger, a, 60)
        await ledger.settle(settlement(first, 25))
        await admit(ledger, a, 5)  # held: 5, spent: 25
        await ledger.client().hset(key(ledger, a), "limit", 500)
        reply = await ledger._eval(
            "reserve", [key(ledger, a)], ["h:" + new_reservation_id(), 1000, DAY_MS, DAY_MS, 100, 30]
        )
        status, seconds, micros, override, held, spent, epoch = reply.split(" ", 6)
        assert (status, epoch, override, held, spent) == ("1", first.holds[0].epoch, "500", "5", "25")
        now = int(seconds) * 1000 + int(micros) // 1000
        assert abs(now - await server_ms(ledger)) < 5_000

    async def test_an_id_with_spaces_makes_an_epoch_the_reply_still_carries(
        self, make_ledger: Any
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        made = await admit(ledger, a, 1, rid="an id  with spaces")
        again = await admit(ledger, a, 1)  # the common case: its reply ends with that epoch
        assert made_by(made.holds[0].epoch, "an id  with spaces")
        assert again.holds[0].epoch == made.holds[0].epoch
        assert again.holds[0].remaining == LIMIT - 2

    async def test_the_ledger_works_out_the_same_reservation_from_either_reply(
        self, make_ledger: Any
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 60)
        await ledger.settle(settlement(r, 25))
        common = await admit(ledger, a, 10)  # the state exists: the common case
        await ledger.client().hset(key(ledger, a), "pa", 0)  # a purge pass due: the general path
        general = await admit(ledger, a, 10)
        for got in (common, general):
            (hold,) = got.holds
            assert (hold.epoch, hold.limit, hold.amount) == (r.holds[0].epoch, LIMIT, 10)
            assert hold.window == a.window_of(got.now_ms)
            assert hold.reset_ms == a.reset_ms(hold.window)
        assert common.holds[0].remaining == LIMIT - 25 - 10
        assert general.holds[0].remaining == LIMIT - 25 - 20
        rejected = await ledger.reserve(new_reservation_id(), [HoldRequest(a, 50, 30)], 1000)
        assert isinstance(rejected, Rejection)
        (v,) = rejected.violations
        assert (v.limit, v.spent, v.held, v.amount) == (50, 25, 20, 30)

    async def test_a_ttl_running_short_is_armed_again(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        client = ledger.client()
        await admit(ledger, a, 1)
        soon = await server_ms(ledger) + 5_000
        await client.hset(key(ledger, a), "ttl", soon)
        await client.pexpireat(key(ledger, a), soon)
        r = await admit(ledger, a, 1)
        armed = int((await fields(ledger, a))["ttl"])
        assert armed >= r.now_ms + LONG_LEASE_MS + ledger.horizon_ms
        assert int(await client.pttl(key(ledger, a))) > ledger.horizon_ms

    async def test_a_ttl_armed_far_enough_is_left_alone(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        await admit(ledger, a, 1)
        armed = (await fields(ledger, a))["ttl"]
        await admit(ledger, a, 1)
        assert (await fields(ledger, a))["ttl"] == armed

    async def test_a_budget_with_an_override_loses_its_ttl(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        client = ledger.client()
        await admit(ledger, a, 1)
        # An override in a hash that still has a TTL (as a hash kept for its override would be
        # between the override and its next reserve, were they not written together).
        await client.hset(key(ledger, a), "limit", 500)
        assert int(await client.pttl(key(ledger, a))) > 0
        r = await admit(ledger, a, 1)
        assert r.holds[0].limit == 500
        assert r.holds[0].remaining == 498
        assert (await fields(ledger, a))["ttl"] == "-1"
        assert int(await client.pttl(key(ledger, a))) == -1

    async def test_the_first_reserve_of_a_new_window_brings_the_purge_forward(
        self, make_ledger: Any
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a", period_ms=2_000)  # a window that ends before the lease does
        client = ledger.client()
        await admit(ledger, a, 1)
        # No spend in the window yet, and no pass due for a long time.
        await client.hset(key(ledger, a), "pa", 2**52)
        r = await admit(ledger, a, 1)
        assert int((await fields(ledger, a))["pa"]) == r.holds[0].window + 2_000

    async def test_a_settle_of_one_budget_adds_and_releases_once(self, make_ledger: Any) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        r = await admit(ledger, a, 30)
        assert (await ledger.settle(settlement(r, 7))).outcomes == ("applied",)
        assert (await ledger.settle(settlement(r, 7))).outcomes == ("duplicate",)
        f = await fields(ledger, a)
        assert f["held"] == "0"
        assert f[f"s:{r.holds[0].window}"] == "7"
        assert "h:" + r.id not in f
