"""One budget's common-case reserve (a string reply parsed in Python) against the general path.

The reserve script serves one budget whose state exists, with no purge pass due and not a retry,
first, and replies with a string of what it read; ``ledger/_replies.py`` works the limit and
what remains out of it. The general path (and the script before the common case was added) reads
the same fields in Lua and replies with the numbers. Each test here makes two budgets with the same
state and forces one through the general path (``pa`` 0: a purge pass under way), so a difference
between the two is a difference between the paths.

``TestAnOverrideIsReadAsTheScriptReadsIt`` shows a defect, now fixed: Lua reads the ``limit``
override with ``s + 0``, which takes any Lua number ('1000.0', '1e3', ' 1000', '0x3e8'; ``limit.lua``
stored any value ``tonumber`` accepted), and admits or refuses with it; the common case's reply
carried the override as stored, and the Python parse, ``int()``, raised ``LedgerError`` for anything
but a canonical integer after the script had decided (and, when it admitted, written the hold). The
common case now sends the number it read, ``limit.lua`` stores only integers as Redis writes them
and ``set_limit`` refuses anything but an int of micro-units.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from budget_middleware.budgets import Budget
from budget_middleware.ledger import HoldRequest, Rejection, Reservation, new_reservation_id

DAY_MS = 86_400_000
LIMIT = 10**9
LONG_LEASE_MS = 60_000

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("redis", marks=pytest.mark.redis, id="redis")], indirect=True
)


# -- helpers --------------------------------------------------------------------------------------


def budget(entity: str, period_ms: int = DAY_MS, rule: str = "user") -> Budget:
    return Budget(rule, entity, period_ms)


def key(ledger: Any, b: Budget) -> str:
    return str(ledger.layout.key(b))


async def fields(ledger: Any, b: Budget) -> dict[str, str]:
    return dict(await ledger.client().hgetall(key(ledger, b)))


async def admit(ledger: Any, b: Budget, amount: int, limit: int = LIMIT) -> Reservation:
    result = await ledger.reserve(new_reservation_id(), [HoldRequest(b, limit, amount)], LONG_LEASE_MS)
    assert isinstance(result, Reservation), result
    return result


async def through_general_path(ledger: Any, b: Budget) -> None:
    """Make the next reserve of ``b`` take the general path: a purge pass under way."""
    await ledger.client().hset(key(ledger, b), "pa", 0)


async def stored_override_twice(ledger: Any, override: str) -> tuple[Budget, Budget]:
    """Two budgets with one hold each and ``override`` stored as their limit, as it is written; the
    next reserve of the second takes the general path, of the first the common case."""
    common, general = budget("r:common"), budget("r:general")
    for b in (common, general):
        await admit(ledger, b, 1)
        await ledger.client().hset(key(ledger, b), "limit", override)
    await through_general_path(ledger, general)
    return common, general


# =================================================================================================
# Defects
# =================================================================================================

# Values limit.lua accepts (Lua's tonumber) and reserve.lua reads as 1000 (`s + 0`).
LUA_NUMBERS_FOR_1000 = [
    pytest.param("1000.0", id="decimal-point"),
    pytest.param("1e3", id="exponent"),
    pytest.param(" 1000", id="leading-space"),
    pytest.param("1000 ", id="trailing-space"),
    pytest.param("0x3e8", id="hex"),
]


class TestAnOverrideIsReadAsTheScriptReadsIt:
    @pytest.mark.parametrize("override", LUA_NUMBERS_FOR_1000)
    async def test_an_admitted_common_case_reports_the_limit_the_general_path_reports(
        self, make_ledger: Any, override: str
    ) -> None:
        """The script admits against limit 1000 in both paths; the general path replies limit 1000,
        the common case's reply carries the override as stored and the Python parse refuses it
        (``int('1000.0')``, ``int('1e3')``; a space shifts every field after it), so the reserve
        raises though its hold was written."""
        ledger = await make_ledger()
        common, general = await stored_override_twice(ledger, override)
        by_general = await admit(ledger, general, 10)
        assert (by_general.holds[0].limit, by_general.holds[0].remaining) == (1000, 989)
        by_common = await admit(ledger, common, 10)
        assert (by_common.holds[0].limit, by_common.holds[0].remaining) == (1000, 989)
        assert (await fields(ledger, common))["held"] == (await fields(ledger, general))["held"]

    @pytest.mark.parametrize("override", LUA_NUMBERS_FOR_1000)
    async def test_a_refused_common_case_reports_the_violation_the_general_path_reports(
        self, make_ledger: Any, override: str
    ) -> None:
        ledger = await make_ledger()
        common, general = await stored_override_twice(ledger, override)
        views = []
        for b in (general, common):
            refused = await ledger.reserve(
                new_reservation_id(), [HoldRequest(b, LIMIT, 2000)], LONG_LEASE_MS
            )
            assert isinstance(refused, Rejection), refused
            (v,) = refused.violations
            views.append((v.limit, v.spent, v.held, v.amount))
        assert views == [(1000, 0, 1, 2000), (1000, 0, 1, 2000)]

    @pytest.mark.parametrize(
        "bad", [1000.0, True, -1, 2**53, "1000"], ids=["float", "bool", "negative", "huge", "str"]
    )
    async def test_set_limit_refuses_what_is_not_an_int_of_micro_units(
        self, make_ledger: Any, bad: object
    ) -> None:
        """A float once reached Redis as '1000.0', which limit.lua stored; now ``set_limit``
        refuses it and anything else that is not an amount in micro-units, and writes nothing."""
        ledger = await make_ledger()
        a = budget("r:a")
        await admit(ledger, a, 1)
        before = await fields(ledger, a)
        with pytest.raises(ValueError, match="limit"):
            await ledger.set_limit(a, cast(Any, bad))
        assert await fields(ledger, a) == before

    @pytest.mark.parametrize("stored", ["1000.0", "1e3", " 1000", "-5", "9007199254740992"])
    async def test_the_limit_script_stores_only_integers_as_redis_writes_them(
        self, make_ledger: Any, stored: str
    ) -> None:
        ledger = await make_ledger()
        a = budget("r:a")
        with pytest.raises(Exception, match="bad arguments"):
            await ledger._eval("limit", [key(ledger, a)], [stored, DAY_MS, DAY_MS])
        assert await fields(ledger, a) == {}
