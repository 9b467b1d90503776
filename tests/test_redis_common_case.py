"""One budget's common-case reserve (a string reply parsed in Python) against the general path.

The reserve script serves one budget whose state exists, with no purge pass due and not a retry,
first, and replies with a string of what it read; ``_common_reserve_result`` works the limit and
what remains out of it. The general path (and the script before the common case was added) reads
the same fields in Lua and replies with the numbers. Each test here makes two budgets with the same
state and forces one through the general path (``pa`` 0: a purge pass under way), so a difference
between the two is a difference between the paths.

``TestAnOverrideIsReadAsTheScriptReadsIt`` shows a defect: Lua reads the ``limit`` override with
``s + 0``, which takes any Lua number ('1000.0', '1e3', ' 1000', '0x3e8'; ``limit.lua`` stores any
value ``tonumber`` accepts), and admits or refuses with it; the Python parse reads it with ``int()``
and, for anything but a canonical integer, raises ``LedgerError`` after the script has already
decided (and, when it admitted, written the hold). The general path answers with limit 1000.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from budget_middleware.keys import Budget
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
        common, general = budget("r:common"), budget("r:general")
        for b in (common, general):
            await admit(ledger, b, 1)
            await ledger.client().hset(key(ledger, b), "limit", override)
        await through_general_path(ledger, general)
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
        common, general = budget("r:common"), budget("r:general")
        for b in (common, general):
            await admit(ledger, b, 1)
            await ledger.client().hset(key(ledger, b), "limit", override)
        await through_general_path(ledger, general)
        views = []
        for b in (general, common):
            refused = await ledger.reserve(
                new_reservation_id(), [HoldRequest(b, LIMIT, 2000)], LONG_LEASE_MS
            )
            assert isinstance(refused, Rejection), refused
            (v,) = refused.violations
            views.append((v.limit, v.spent, v.held, v.amount))
        assert views == [(1000, 0, 1, 2000), (1000, 0, 1, 2000)]

    async def test_a_float_override_set_through_set_limit_keeps_the_budget_usable(
        self, make_ledger: Any
    ) -> None:
        """``set_limit`` does not check its value: a float reaches Redis as '1000.0', which
        limit.lua stores and the old script read as 1000. With the common case, every reserve of
        the budget (one rule, state made, no pass due) now raises ``LedgerError``."""
        ledger = await make_ledger()
        a = budget("r:a")
        await admit(ledger, a, 1)
        await ledger.set_limit(a, cast(Any, 1000.0))
        r = await admit(ledger, a, 10)
        assert (r.holds[0].limit, r.holds[0].remaining) == (1000, 989)
