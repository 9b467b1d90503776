"""The Redis layout: one hash per budget, its TTL, and the purge passes that sweep it.

These look inside Redis (the ledger suite only looks through the ledger's API): every budget is one
hash that expires when idle unless it must not, a busy budget keeps no field per request, and
expired holds, tombstones and old windows are swept a bounded batch at a time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from budget_middleware.budgets import Budget
from budget_middleware.ledger import HoldRequest, Reservation, Settlement, new_reservation_id

DAY_MS = 86_400_000
LONG_LEASE_MS = 60_000

REDIS = pytest.param("redis", marks=pytest.mark.redis, id="redis")
FAKE = pytest.param("fakeredis", marks=pytest.mark.fakeredis, id="fakeredis")
both = pytest.mark.parametrize("backend", [FAKE, REDIS], indirect=True)


def budget(entity: str = "r:alice", period_ms: int = DAY_MS) -> Budget:
    return Budget("user", entity, period_ms)


async def admit(ledger: Any, b: Budget, limit: int, amount: int, lease_ms: int) -> Reservation:
    result = await ledger.reserve(new_reservation_id(), [HoldRequest(b, limit, amount)], lease_ms)
    assert isinstance(result, Reservation), result
    return result


async def settle(ledger: Any, r: Reservation, actual: int) -> str:
    s = Settlement(r.id, r.holds, actual, "completed", estimate=r.holds[0].amount)
    return str((await ledger.settle(s)).outcome)


async def fields(ledger: Any, b: Budget) -> dict[str, str]:
    return dict(await ledger.client().hgetall(ledger.layout.key(b)))


async def pttl(ledger: Any, b: Budget) -> int:
    return int(await ledger.client().pttl(ledger.layout.key(b)))


async def until(condition: Any, within: float = 10.0) -> None:
    """Poll the async ``condition`` until it returns True; fail at the deadline."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@both
class TestOneHashPerBudget:
    async def test_a_budget_is_one_key(self, ledger: Any) -> None:
        a, b = budget("r:alice"), budget("r:bob")
        for x in (a, b):
            await settle(ledger, await admit(ledger, x, 100, 5, LONG_LEASE_MS), 3)
        keys = sorted([k async for k in ledger.client().scan_iter(match="*")])
        assert keys == sorted([ledger.layout.key(a), ledger.layout.key(b)])

    async def test_a_busy_budget_keeps_no_field_per_request(self, ledger: Any) -> None:
        b = budget()
        for _ in range(300):
            await settle(ledger, await admit(ledger, b, 10**9, 5, LONG_LEASE_MS), 2)
        f = await fields(ledger, b)
        assert not [k for k in f if k[:2] in ("h:", "t:", "d:")]
        assert int(f["held"]) == 0
        assert sum(int(v) for k, v in f.items() if k.startswith("s:")) == 600
        assert len(f) <= 6, f

    async def test_a_rejected_reserve_on_an_unknown_budget_writes_nothing(self, ledger: Any) -> None:
        b = budget("r:nobody")
        result = await ledger.reserve(new_reservation_id(), [HoldRequest(b, 0, 1)], LONG_LEASE_MS)
        assert not result.admitted
        assert await ledger.client().exists(ledger.layout.key(b)) == 0


@both
class TestTTL:
    async def test_a_periodic_budget_expires_after_its_window_and_the_horizon(self, ledger: Any) -> None:
        b = budget(period_ms=DAY_MS)
        r = await admit(ledger, b, 100, 5, LONG_LEASE_MS)
        ttl = await pttl(ledger, b)
        window_end = r.holds[0].window + DAY_MS
        # Armed well past the lease plus the horizon, and past the window's end.
        assert ttl > LONG_LEASE_MS + ledger.horizon_ms
        assert r.now_ms + ttl >= window_end
        assert int((await fields(ledger, b))["ttl"]) >= r.now_ms + ttl - 1000

    async def test_a_lifetime_budget_never_expires(self, ledger: Any) -> None:
        b = budget(period_ms=0)
        await settle(ledger, await admit(ledger, b, 100, 5, LONG_LEASE_MS), 5)
        assert await pttl(ledger, b) == -1

    async def test_an_override_keeps_the_budget_and_clearing_it_arms_the_ttl(self, ledger: Any) -> None:
        b = budget()
        await settle(ledger, await admit(ledger, b, 100, 5, LONG_LEASE_MS), 5)
        assert await pttl(ledger, b) > 0
        await ledger.set_limit(b, 50)
        assert await pttl(ledger, b) == -1
        await settle(ledger, await admit(ledger, b, 100, 5, LONG_LEASE_MS), 5)
        assert await pttl(ledger, b) == -1  # a reserve does not arm it while the override is set
        await ledger.set_limit(b, None)
        assert await pttl(ledger, b) > 2 * ledger.horizon_ms - 10_000
        assert (await ledger.usage(b, 100)).spent == 10  # the spend is kept

    async def test_a_lifetime_budget_without_spend_expires(self, ledger: Any) -> None:
        b = budget("r:throwaway", period_ms=0)
        r = await admit(ledger, b, 100, 5, LONG_LEASE_MS)
        assert await settle(ledger, r, 0) == "applied"  # an error, a 4xx: nothing charged
        assert await pttl(ledger, b) > 0
        await settle(ledger, await admit(ledger, b, 100, 5, LONG_LEASE_MS), 2)
        assert await pttl(ledger, b) == -1  # its first spend: kept from now on
        await ledger.reset(b)
        assert await pttl(ledger, b) > 0  # nothing left to keep

    async def test_an_override_set_and_cleared_on_an_unknown_budget_leaves_nothing(
        self, ledger: Any
    ) -> None:
        for period in (0, DAY_MS):
            b = budget(f"r:vip-{period}", period_ms=period)
            await ledger.set_limit(b, 7)
            await ledger.set_limit(b, None)
            assert await ledger.client().exists(ledger.layout.key(b)) == 0

    async def test_clearing_an_override_keeps_a_lifetime_spend(self, ledger: Any) -> None:
        b = budget("r:lifer", period_ms=0)
        await settle(ledger, await admit(ledger, b, 100, 5, LONG_LEASE_MS), 3)
        await ledger.set_limit(b, 50)
        await ledger.set_limit(b, None)
        assert await pttl(ledger, b) == -1
        assert (await ledger.usage(b, 100)).spent == 3

    async def test_an_override_on_an_unknown_budget_is_kept(self, ledger: Any) -> None:
        b = budget("r:vip")
        await ledger.set_limit(b, 7)
        assert await pttl(ledger, b) == -1
        assert (await ledger.usage(b, 100)).limit == 7


@both
class TestPurgePasses:
    async def test_old_windows_are_swept(self, ledger: Any) -> None:
        b = budget(period_ms=100)
        windows: set[int] = set()
        deadline = time.monotonic() + 10
        while len(windows) < 8:
            assert time.monotonic() < deadline
            r = await admit(ledger, b, 10**9, 5, LONG_LEASE_MS)
            windows.add(r.holds[0].window)
            await settle(ledger, r, 1)
            await asyncio.sleep(0.01)
        spent_fields = [k for k in await fields(ledger, b) if k.startswith("s:")]
        assert len(spent_fields) <= 3, spent_fields

    async def test_tombstones_are_swept_after_the_horizon(self, make_ledger: Any) -> None:
        ledger = await make_ledger(horizon_ms=300)
        b = budget()
        for _ in range(5):
            await admit(ledger, b, 10**9, 5, 50)  # never settled: each becomes a tombstone

        async def tombstones() -> int:
            return sum(1 for k in await fields(ledger, b) if k.startswith("t:"))

        async def purged() -> bool:
            await settle(ledger, await admit(ledger, b, 10**9, 1, 100), 1)
            return await tombstones() == 5

        await until(purged)

        async def swept() -> bool:
            await settle(ledger, await admit(ledger, b, 10**9, 1, 100), 1)
            return await tombstones() == 0

        await until(swept)
        assert int((await fields(ledger, b))["held"]) == 0


@pytest.mark.parametrize("backend", [REDIS], indirect=True)
class TestBoundedWork:
    """Real Redis only: HSCAN batches are a property of Redis's hash table.

    A hash of up to ``hash-max-listpack-entries`` fields (128 by default, 512 in Debian's build) is
    one compact block that HSCAN returns whole; past that, a batch is about 64 fields. The test
    lowers the threshold so that a few hundred holds make a hash table.
    """

    HOLDS = 200
    LEASE_MS = 2000

    async def test_a_reserve_purges_a_batch_and_the_rest_follow(self, ledger: Any) -> None:
        client = ledger.client()
        entries = (await client.config_get("hash-max-listpack-entries"))["hash-max-listpack-entries"]
        await client.config_set("hash-max-listpack-entries", 16)
        try:
            await self._purge_in_batches(ledger)
        finally:
            await client.config_set("hash-max-listpack-entries", entries)

    async def _purge_in_batches(self, ledger: Any) -> None:
        b = budget()
        short = [await admit(ledger, b, 10**9, 3, self.LEASE_MS) for _ in range(self.HOLDS)]
        assert await ledger.client().object("encoding", ledger.layout.key(b)) == "hashtable"
        assert not any(r.purged for r in short)  # all were taken before the first expired
        last_expiry = max(r.now_ms for r in short) + self.LEASE_MS

        async def expired() -> bool:
            seconds, micros = await ledger.client().time()
            return bool(seconds * 1000 + micros // 1000 > last_expiry)

        await until(expired)
        first = await ledger.reserve(new_reservation_id(), [HoldRequest(b, 10**9, 1)], 100)
        assert isinstance(first, Reservation)
        assert 0 < first.purged < self.HOLDS  # bounded: a batch, not the whole budget
        seen = set(first.expired_ids)
        deadline = time.monotonic() + 10
        # Every short hold goes in later batches, and so does the first reserve's own, taken
        # while the pass was under way and never settled.
        while len(seen) < self.HOLDS + 1:
            assert time.monotonic() < deadline, len(seen)
            r = await admit(ledger, b, 10**9, 1, LONG_LEASE_MS)
            seen.update(r.expired_ids)
            await settle(ledger, r, 0)
        assert seen == {r.id for r in short} | {first.id}
        assert int((await fields(ledger, b))["held"]) == 0
        # A late settle of each still counts once.
        outcomes = {await settle(ledger, r, 2) for r in short}
        assert outcomes == {"late"}
        u = await ledger.usage(b, 10**9)
        assert (u.held, u.holds, u.spent) == (0, 0, 2 * self.HOLDS)


@pytest.mark.parametrize(
    ("keys", "args"),
    [
        (["budget:{user:r:alice}"], ["0123abcd", 60_000, 86_400_000, "f00d", 0, 10**15, 0]),
        (["budget:{user:r:a}", "budget:{team:h:" + "0" * 32 + "}"], ["id", -1, "", 7]),
        (["k{é}"], ["ünïcode", 5]),  # not ASCII: packed per value
    ],
)
def test_packed_script_calls_match_redis_py(keys: list[str], args: list[Any]) -> None:
    from redis.asyncio.connection import Connection

    from budget_middleware.ledger._transport import load_scripts, pack_evalsha

    script = load_scripts()["reserve"]
    reference = b"".join(Connection().pack_command("EVALSHA", script.sha, len(keys), *keys, *args))
    assert pack_evalsha(script, keys, args) == reference
