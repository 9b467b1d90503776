"""The Redis Cluster ledger on a real three-primary cluster (``tests/redis_cluster.py``).

Two parts: cluster-specific checks (reservations across slots, their release when a later slot
refuses or fails, NOSCRIPT after SCRIPT FLUSH, lost state, concurrency), and the whole ledger
contract of ``tests/test_ledger.py`` run once more on the cluster: its test classes are imported
here, and this module's ``make_ledger`` fixture (which overrides the parametrised one of conftest)
gives them cluster ledgers. Its budgets (``user:r:alice``, ``team:r:t1``, ``global:r:all``...) live
in different slots, so that suite exercises the multi-slot paths too.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

import test_ledger
from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    LedgerUnavailable,
    RedisClusterLedger,
    RedisLedger,
    RedisSentinelLedger,
    Reservation,
    Settlement,
    new_reservation_id,
    redis_ledger_from_url,
)
from redis_cluster import RedisClusterServers, slot_of
from redis_server import free_port
from test_ledger import (
    LONG_LEASE_MS,
    admit,
    budget,
    eventually,
    hold,
    refuse,
    settle,
    settlement,
    usage,
)

pytestmark = pytest.mark.redis

DAY_MS = 86_400_000


# -- the cluster and its ledgers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """Three primaries for the whole module (skipped, or failed on CI, without the binaries)."""
    servers = RedisClusterServers().start()
    try:
        yield servers
    finally:
        servers.stop()


class ClusterLedgerFactory:
    """``make_ledger`` for the cluster: the interface of conftest's ``LedgerFactory``."""

    backend = "cluster"
    is_redis = True

    def __init__(self, servers: RedisClusterServers) -> None:
        self.servers = servers
        self._ledgers: list[RedisClusterLedger] = []

    async def __call__(self, *, horizon_ms: int = DAY_MS, **options: Any) -> RedisClusterLedger:
        ledger = RedisClusterLedger(self.servers.url, horizon_ms=horizon_ms, **options)
        self._ledgers.append(ledger)
        return ledger

    async def wipe(self, ledger: RedisClusterLedger) -> RedisClusterLedger:
        """Lose every primary's state, as primaries restarted without persistence would."""
        await ledger.cluster().flushall()
        return ledger

    async def aclose(self) -> None:
        for ledger in self._ledgers:
            await ledger.aclose()
        self._ledgers.clear()


@pytest.fixture
async def make_ledger(cluster: RedisClusterServers) -> AsyncIterator[ClusterLedgerFactory]:
    """Cluster ledgers on a flushed cluster (overrides conftest's parametrised fixture here)."""
    cluster.flushall()
    factory = ClusterLedgerFactory(cluster)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def cl(make_ledger: ClusterLedgerFactory) -> RedisClusterLedger:
    return await make_ledger()


def spread(
    ledger: RedisLedger, count: int, servers: RedisClusterServers, rule: str = "user"
) -> list[Budget]:
    """``count`` lifetime budgets, each in a slot served by a different primary, in slot order:
    the order a reservation takes them in when their limits are equal."""
    owners = servers.slot_owners()
    found: dict[int, Budget] = {}
    for n in range(10_000):
        b = budget(rule, f"r:e{n}")
        slot = slot_of(ledger.layout.key(b))
        if owners[slot] not in {owners[s] for s in found}:
            found[slot] = b
            if len(found) == count:
                return [found[s] for s in sorted(found)]
    raise AssertionError(f"could not find {count} budgets on different primaries")


async def assert_clean(ledger: Any, budgets: list[Budget], limit: int = 100, spent: int = 0) -> None:
    for b in budgets:
        u = await usage(ledger, b, limit)
        assert (u.held, u.holds, u.spent) == (0, 0, spent), (b, u)


# -- the ledger contract, once more on the cluster ------------------------------------------------

TestAllOrNothing = test_ledger.TestAllOrNothing
TestRejectionFields = test_ledger.TestRejectionFields
TestAdmissionNeedsRoom = test_ledger.TestAdmissionNeedsRoom
TestIdempotentReserve = test_ledger.TestIdempotentReserve
TestSettle = test_ledger.TestSettle
TestReleaseOfAnUnansweredReserve = test_ledger.TestReleaseOfAnUnansweredReserve
TestLeaseExpiry = test_ledger.TestLeaseExpiry
TestExtend = test_ledger.TestExtend
TestStale = test_ledger.TestStale
TestRecovered = test_ledger.TestRecovered
TestWindows = test_ledger.TestWindows
TestLimitOverride = test_ledger.TestLimitOverride
TestReset = test_ledger.TestReset
TestUsage = test_ledger.TestUsage
TestLeaseBounds = test_ledger.TestLeaseBounds
TestInvariantsUnderConcurrency = test_ledger.TestInvariantsUnderConcurrency


# -- cluster specifics ----------------------------------------------------------------------------


class TestSingleSlot:
    async def test_reserve_settle_duplicate(self, cl: RedisClusterLedger) -> None:
        b = budget()
        r = await admit(cl, hold(b, 100, 30))
        assert (await usage(cl, b)).held == 30
        assert (await settle(cl, r, 12)).outcome == "applied"
        assert (await settle(cl, r, 12)).outcome == "duplicate"
        u = await usage(cl, b)
        assert (u.spent, u.held, u.holds) == (12, 0, 0)

    async def test_with_a_client_the_caller_owns(self, cluster: RedisClusterServers) -> None:
        cluster.flushall()
        nodes = [ClusterNode("127.0.0.1", n.port) for n in cluster.nodes]
        client = RedisCluster(startup_nodes=nodes, decode_responses=True)
        ledger = RedisClusterLedger(client=client)
        try:
            a, b = spread(ledger, 2, cluster)
            r = await admit(ledger, hold(a, 10, 4), hold(b, 10, 4))
            assert (await settle(ledger, r, 3)).outcomes == ("applied", "applied")
            await ledger.aclose()  # leaves the caller's client open
            assert await client.ping()
        finally:
            await client.aclose()


class TestAcrossSlots:
    async def test_budgets_on_three_primaries(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        budgets = spread(cl, 3, cluster)
        assert len({slot_of(cl.layout.key(b)) for b in budgets}) == 3
        assert len({cluster.node_of_slot(cl.slot(b)).port for b in budgets}) == 3

    async def test_admitted_and_settled_on_every_slot(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        budgets = spread(cl, 3, cluster)
        limits = [10, 20, 30]
        r = await admit(cl, *(hold(b, lim, 5) for b, lim in zip(budgets, limits, strict=True)))
        assert [h.budget for h in r.holds] == budgets
        assert [(h.amount, h.limit, h.remaining) for h in r.holds] == [
            (5, 10, 5),
            (5, 20, 15),
            (5, 30, 25),
        ]
        assert all(h.epoch for h in r.holds)
        assert r.replayed is False
        for b in budgets:
            assert (await usage(cl, b)).held == 5
        again = await admit(
            cl, *(hold(b, lim, 5) for b, lim in zip(budgets, limits, strict=True)), rid=r.id
        )
        assert again.replayed is True
        assert [(h.window, h.epoch) for h in again.holds] == [(h.window, h.epoch) for h in r.holds]
        out = await settle(cl, r, 4)
        assert out.outcomes == ("applied", "applied", "applied")
        assert (await settle(cl, r, 4)).outcomes == ("duplicate",) * 3
        await assert_clean(cl, budgets, spent=4)

    async def test_settle_many_keeps_the_order(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        a, b, c = spread(cl, 3, cluster)
        r1 = await admit(cl, hold(a, 100, 5), hold(b, 100, 5))
        r2 = await admit(cl, hold(c, 100, 5))
        r3 = await admit(cl, hold(c, 100, 5), hold(a, 100, 5), hold(b, 100, 5))
        await settle(cl, r2, 1)  # r2 is a duplicate in the batch below
        out = await cl.settle_many([settlement(r1, 2), settlement(r2, 1), settlement(r3, 3)])
        assert [s.reservation_id for s in out] == [r1.id, r2.id, r3.id]
        assert [s.outcomes for s in out] == [("applied",) * 2, ("duplicate",), ("applied",) * 3]
        assert [(await usage(cl, x)).spent for x in (a, b, c)] == [5, 5, 4]

    async def test_extend_renews_every_slot(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        budgets = spread(cl, 3, cluster)
        r = await admit(cl, *(hold(b, 100, 5) for b in budgets), lease_ms=5_000)
        renewed = await cl.extend([r], LONG_LEASE_MS)
        assert (renewed.renewed, renewed.reheld, renewed.missing) == (3, 0, 0)
        await settle(cl, r, 5)
        gone = await cl.extend([r], LONG_LEASE_MS)
        assert (gone.renewed, gone.missing) == (0, 3)

    @pytest.mark.parametrize("refusing", [0, 1, 2])
    async def test_a_refusing_slot_leaves_no_hold_on_any_slot(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers, refusing: int
    ) -> None:
        budgets = spread(cl, 3, cluster)  # equal limits: reserved in this order
        full = budgets[refusing]
        await settle(cl, await admit(cl, hold(full, 10, 8)), 8)
        rej = await refuse(cl, *(hold(b, 10, 5) for b in budgets))
        assert [v.budget for v in rej.violations] == [full]
        (v,) = rej.violations
        assert (v.limit, v.spent, v.held, v.amount) == (10, 8, 0, 5)
        for b in budgets:
            u = await usage(cl, b, 10)
            assert (u.held, u.holds, u.spent) == (0, 0, 8 if b == full else 0), (b, u)
        # The others still admit their whole limit: nothing was left behind.
        await admit(cl, *(hold(b, 10, 10) for b in budgets if b != full))

    async def test_every_violation_is_reported_across_slots(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        a, b, c = spread(cl, 3, cluster)
        await settle(cl, await admit(cl, hold(c, 4, 3)), 3)
        rej = await refuse(cl, hold(a, 10, 5), hold(b, 2, 5), hold(c, 4, 5))
        assert [v.budget for v in rej.violations] == [b, c]
        assert [(v.limit, v.spent) for v in rej.violations] == [(2, 0), (4, 3)]
        await assert_clean(cl, [a, b])

    async def test_a_rejection_reads_the_later_slots_with_one_bounded_step(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        """Failed before: the budgets of the slots after the refusing one were read with a whole
        ``usage``, a full purge pass of each on the request path (all 3000 expired holds here)."""
        a, b = spread(cl, 2, cluster)
        expired = 3000
        k = cl.layout.key(b)
        holds = {f"h:{new_reservation_id()}": "1000:1" for _ in range(expired)}  # long expired
        items = list(holds.items())
        for i in range(0, expired, 1000):
            await cl.cluster().hset(k, mapping=dict(items[i : i + 1000]))
        await cl.cluster().hset(k, mapping={"held": expired, "epoch": "e", "ttl": -1, "pa": 1})
        rej = await refuse(cl, hold(a, 2, 5), hold(b, 10**6, 1))  # a, the tightest, refuses first
        assert [v.budget for v in rej.violations] == [a]
        assert 0 < rej.purged <= 200
        u = await usage(cl, b, 10**6)
        assert (u.held, u.holds, rej.purged + u.purged) == (0, 0, expired)

    async def test_a_slot_failing_with_an_error_reply_leaves_no_hold(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        a, b, c = spread(cl, 3, cluster)
        # Poison c's key: every script on c's slot now fails with WRONGTYPE.
        key = cl.layout.key(c)
        for node in cluster.nodes:
            with node.client() as sync:
                if cluster.node_of_slot(slot_of(key)).port == node.port:
                    sync.rpush(key, "x")
        with pytest.raises(LedgerError, match="WRONGTYPE"):
            await cl.reserve(
                new_reservation_id(), [hold(a, 10, 5), hold(b, 10, 5), hold(c, 10, 5)], LONG_LEASE_MS
            )
        await assert_clean(cl, [a, b], limit=10)

    async def test_an_unreachable_slot_leaves_no_hold(
        self, make_ledger: ClusterLedgerFactory, cluster: RedisClusterServers
    ) -> None:
        ledger = FlakyClusterLedger(cluster.url)
        make_ledger._ledgers.append(ledger)
        a, b, c = spread(ledger, 3, cluster)
        ledger.broken = {("reserve", ledger.slot(c))}
        with pytest.raises(LedgerUnavailable, match="connection refused"):
            await ledger.reserve(
                new_reservation_id(), [hold(a, 10, 5), hold(b, 10, 5), hold(c, 10, 5)], LONG_LEASE_MS
            )
        assert ledger.failed == 1
        await assert_clean(ledger, [a, b, c], limit=10)

    async def test_a_release_that_fails_raises_and_the_callers_release_cleans_up(
        self, make_ledger: ClusterLedgerFactory, cluster: RedisClusterServers
    ) -> None:
        ledger = FlakyClusterLedger(cluster.url)
        make_ledger._ledgers.append(ledger)
        a, b, c = spread(ledger, 3, cluster)
        await settle(ledger, await admit(ledger, hold(c, 10, 8)), 8)
        holds = [hold(a, 10, 5), hold(b, 10, 5), hold(c, 10, 5)]  # c, reserved last, refuses
        ledger.broken = {("settle", ledger.slot(a))}  # and a's release fails
        rid = new_reservation_id()
        with pytest.raises(LedgerUnavailable, match="could not be released"):
            await ledger.reserve(rid, holds, LONG_LEASE_MS)
        assert (await usage(ledger, a, 10)).held == 5  # left behind, until its lease ends...
        await assert_clean(ledger, [b], limit=10)
        await assert_clean(ledger, [c], limit=10, spent=8)
        ledger.broken = set()
        blind = tuple(HeldBudget(h.budget, h.amount, -1, "", h.limit, 0, None) for h in holds)
        out = await ledger.settle(Settlement(rid, blind, 0, "release-unavailable"))
        assert out.outcomes == ("applied", "duplicate", "duplicate")  # ...or the caller's release
        await assert_clean(ledger, [a, b], limit=10)

    async def test_cancelled_between_slots_releases_in_the_background(
        self, make_ledger: ClusterLedgerFactory, cluster: RedisClusterServers
    ) -> None:
        ledger = FlakyClusterLedger(cluster.url)
        make_ledger._ledgers.append(ledger)
        a, b = spread(ledger, 2, cluster)
        ledger.stall = ledger.slot(b)
        task = asyncio.create_task(
            ledger.reserve(new_reservation_id(), [hold(a, 10, 5), hold(b, 10, 5)], LONG_LEASE_MS)
        )
        await eventually(lambda: asyncio.sleep(0, ledger.stalled), bool)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ledger.resume.set()
        await eventually(lambda: usage(ledger, a, 10), lambda u: u.holds == 0)
        await assert_clean(ledger, [a, b], limit=10)

    async def test_lease_expiry_and_late_settle(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        budgets = spread(cl, 3, cluster)
        r = await admit(cl, *(hold(b, 100, 40) for b in budgets), lease_ms=50)
        for b in budgets:
            u = await eventually(lambda b=b: usage(cl, b), lambda u: u.holds == 0)
            assert u.held == 0
        # The room is back while the hold is a tombstone.
        await settle(cl, await admit(cl, *(hold(b, 100, 100) for b in budgets)), 0)
        out = await settle(cl, r, 30)
        assert out.outcomes == ("late", "late", "late")
        await assert_clean(cl, budgets, spent=30)

    async def test_recovered_after_flushall_on_every_primary(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        budgets = spread(cl, 3, cluster)
        r = await admit(cl, *(hold(b, 100, 10) for b in budgets))
        cluster.flushall()
        assert (await settle(cl, r, 7)).outcomes == ("recovered",) * 3
        await assert_clean(cl, budgets, spent=7)
        assert (await settle(cl, r, 7)).outcomes == ("duplicate",) * 3
        after = await admit(cl, *(hold(b, 100, 10) for b in budgets))
        assert [h.epoch for h in after.holds] != [h.epoch for h in r.holds]

    async def test_script_flush_on_every_node(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        a, b, c = spread(cl, 3, cluster)
        await admit(cl, hold(a, 100, 1))  # scripts loaded, the client knows the slots
        cluster.script_flush()
        r = await admit(cl, hold(a, 100, 5), hold(b, 100, 5), hold(c, 100, 5))  # reserve (pipelined)
        cluster.script_flush()
        assert (await usage(cl, b)).held == 5  # usage (one call)
        cluster.script_flush()
        assert (await cl.extend([r], LONG_LEASE_MS)).renewed == 3
        cluster.script_flush()
        assert (await settle(cl, r, 2)).outcomes == ("applied",) * 3
        cluster.script_flush()
        await cl.reset(c)
        cluster.script_flush()
        uncoalesced = RedisClusterLedger(cluster.url, coalesce=False)
        try:
            assert isinstance(
                await uncoalesced.reserve(new_reservation_id(), [hold(c, 100, 1)], 1_000), Reservation
            )
        finally:
            await uncoalesced.aclose()
        assert [(await usage(cl, x)).spent for x in (a, b)] == [2, 2]

    async def test_no_reachable_node_is_unavailable(self) -> None:
        ledger = RedisClusterLedger(
            f"redis+cluster://127.0.0.1:{free_port()}", socket_timeout=1.0, retries=0
        )
        try:
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable):
                await ledger.reserve(new_reservation_id(), [hold(budget(), 10, 1)], 1_000)
            with pytest.raises(LedgerUnavailable):
                await ledger.usage(budget(), 10)
            with pytest.raises(LedgerUnavailable):
                await ledger.set_limit(budget(), 5)
            assert time.monotonic() - started < 10
        finally:
            await ledger.aclose()

    async def test_warns_about_a_primary_that_may_evict(
        self,
        make_ledger: ClusterLedgerFactory,
        cluster: RedisClusterServers,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        node = cluster.nodes[1]
        with node.client() as sync:
            sync.config_set("maxmemory-policy", "allkeys-lru")
        try:
            ledger = await make_ledger()
            with caplog.at_level("WARNING", logger="budget_middleware"):
                await usage(ledger, budget())
            (record,) = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
            assert f"{node.port}='allkeys-lru'" in record.getMessage()
        finally:
            with node.client() as sync:
                sync.config_set("maxmemory-policy", "noeviction")

    async def test_wait_replicas_on_a_cluster_without_replicas(
        self, cluster: RedisClusterServers
    ) -> None:
        """``WAIT`` runs on the primaries written to; with no replica there, nobody acknowledges."""
        ledger = RedisClusterLedger(cluster.url, wait_replicas=1, wait_timeout_ms=50)
        try:
            with pytest.raises(LedgerUnavailable, match="replicas"):
                await ledger.reserve(new_reservation_id(), [hold(budget(), 10, 1)], 1_000)
        finally:
            await ledger.aclose()

    async def test_two_hundred_concurrent_requests(
        self, cl: RedisClusterLedger, cluster: RedisClusterServers
    ) -> None:
        rng = random.Random(7)
        limits = dict(
            zip(
                spread(cl, 3, cluster, "team") + spread(cl, 3, cluster, "user"),
                [40, 25, 60, 90, 30, 50],
                strict=True,
            )
        )
        names = list(limits)
        expected = dict.fromkeys(names, 0)
        admitted = rejected = samples = 0
        running = True

        async def request() -> None:
            nonlocal admitted, rejected
            picked = rng.sample(names, rng.randint(1, 4))
            estimate = rng.randint(0, 12)
            actual = rng.randint(0, estimate)
            result = await cl.reserve(
                new_reservation_id(),
                [HoldRequest(b, limits[b], estimate) for b in picked],
                LONG_LEASE_MS,
            )
            if not result.admitted:
                rejected += 1
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.005)
            assert (await cl.settle(settlement(result, actual))).outcome == "applied"
            for b in picked:
                expected[b] += actual

        async def sampler() -> None:
            nonlocal samples
            while running:
                for b, limit in limits.items():
                    u = await cl.usage(b, limit)
                    assert u.spent + u.held <= limit, u
                    samples += 1
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(request() for _ in range(200)))
        finally:
            running = False
            await watcher
        assert admitted + rejected == 200
        assert admitted >= 20, admitted
        assert rejected >= 20, rejected
        assert samples > 0
        for b, limit in limits.items():
            u = await cl.usage(b, limit)
            assert (u.held, u.holds) == (0, 0)
            assert u.spent == expected[b] <= limit


@pytest.fixture
def replicated_cluster() -> Iterator[RedisClusterServers]:
    """Three primaries with a replica each: a primary can die and its replica take over."""
    servers = RedisClusterServers(replicas=1).start()
    try:
        yield servers
    finally:
        servers.stop()


class TestFailover:
    async def test_killed_primary_its_replica_takes_over(
        self, replicated_cluster: RedisClusterServers
    ) -> None:
        servers = replicated_cluster
        acked = RedisClusterLedger(servers.url, wait_replicas=1, socket_timeout=1.0, retries=1)
        ledger = RedisClusterLedger(servers.url, socket_timeout=1.0, retries=1)
        try:
            a, b, c = spread(ledger, 3, servers)  # reserved in this order (equal limits)
            # WAIT 1 on every primary written to: the holds are on the replicas before the kill.
            r = await admit(acked, *(hold(x, 100, 10) for x in (a, b, c)))
            assert (await usage(ledger, c)).held == 10
            old = servers.kill_primary_of(ledger.slot(c))
            killed = time.monotonic()
            # c's primary refuses connections: a reservation is held on a and b, fails on c, and
            # a and b are released again (before the cluster notices: within the node timeout).
            with pytest.raises(LedgerUnavailable):
                await ledger.reserve(
                    new_reservation_id(), [hold(x, 100, 5) for x in (a, b, c)], LONG_LEASE_MS
                )
            for x in (a, b):  # other primaries still answer; only r's hold is there
                u = await usage(ledger, x)
                assert (u.held, u.holds) == (10, 1), u
            assert time.monotonic() - killed < servers.node_timeout_ms / 1000
            with pytest.raises(LedgerUnavailable):  # c's slot has no primary until the failover
                await ledger.usage(c, 100)
            new = await asyncio.to_thread(servers.wait_failover, ledger.slot(c), old)
            assert new is not old
            with new.client() as sync:
                # Redis 7 does not replicate SCRIPT LOAD: the promoted replica answers NOSCRIPT
                # (these are all False) and the ledger loads the scripts on it.
                scripts_there = sync.script_exists(*(s.sha for s in ledger._scripts.values()))

            async def probe() -> Any:
                try:
                    return await ledger.usage(c, 100)
                except LedgerUnavailable:
                    return None

            u = await eventually(probe, lambda u: u is not None, within=10.0, interval=0.1)
            assert (u.held, u.holds) == (10, 1)  # r's hold, replicated; nothing of the failed one
            assert (await settle(ledger, r, 6)).outcomes == ("applied",) * 3, scripts_there
            await assert_clean(ledger, [a, b, c], spent=6)
        finally:
            await acked.aclose()
            await ledger.aclose()


class FlakyClusterLedger(RedisClusterLedger):
    """Calls of the (script, slot) pairs in ``broken`` fail as if their primary refused the
    connection (with every other call sent to that primary in the same round trip); reserves on
    slot ``stall`` wait for ``resume``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.broken: set[tuple[str, int]] = set()
        self.failed = 0
        self.stall = -1
        self.stalled = False
        self.resume = asyncio.Event()

    async def _send(self, calls: list[tuple[str, list[str], list[Any]]], wait: bool) -> list[Any]:
        if any(name == "reserve" and slot_of(keys[0]) == self.stall for name, keys, _ in calls):
            self.stalled = True
            await self.resume.wait()
        return await super()._send(calls, wait)

    async def _run_on(
        self,
        client: RedisCluster,
        node: ClusterNode,
        calls: list[tuple[str, list[str], list[Any]]],
        wait: bool,
    ) -> list[Any]:
        if {(name, slot_of(keys[0])) for name, keys, _ in calls} & self.broken:
            self.failed += 1
            raise rexc.ConnectionError("connection refused (injected)")
        return await super()._run_on(client, node, calls, wait)


# -- URLs -----------------------------------------------------------------------------------------


class TestURLs:
    def test_dispatch_on_the_scheme(self) -> None:
        assert type(redis_ledger_from_url("redis://127.0.0.1:6379/0")) is RedisLedger
        cluster = redis_ledger_from_url("redis+cluster://a:7000,b:7001,[::1]:7002,c", prefix="p")
        assert isinstance(cluster, RedisClusterLedger)
        assert cluster._nodes == (("a", 7000), ("b", 7001), ("::1", 7002), ("c", 6379))
        assert cluster.layout.prefix == "p"
        sentinel = redis_ledger_from_url("redis+sentinel://s1:26379,s2/mymaster?db=2")
        assert isinstance(sentinel, RedisSentinelLedger)
        assert (sentinel.service, sentinel._db, sentinel._sentinels) == (
            "mymaster",
            2,
            (("s1", 26379), ("s2", 26379)),
        )

    def test_credentials_and_redaction(self) -> None:
        cluster = RedisClusterLedger("redis+cluster://admin:s3cret@a:7000,b:7001?ssl=true")
        assert cluster._options == {"username": "admin", "password": "s3cret", "ssl": True}
        assert "s3cret" not in repr(cluster)
        sentinel = RedisSentinelLedger("redis+sentinel://:s3cret@s1:26379/svc?sentinel_auth=true")
        assert sentinel._options == {"password": "s3cret"}
        assert sentinel._sentinel_options == {"password": "s3cret"}
        assert "s3cret" not in repr(sentinel)
        own = RedisSentinelLedger("redis+sentinel://s1/svc?password=s3cret", sentinel_password="t0p")
        assert (own._options, own._sentinel_options) == ({"password": "s3cret"}, {"password": "t0p"})
        assert "s3cret" not in repr(own)

    @pytest.mark.parametrize(
        "url",
        [
            "redis+cluster://a:7000/1",
            "redis+cluster://a:notaport",
            "redis+cluster://a:7000,,b:7001",
            "redis+cluster://a:7000?color=blue",
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/svc/extra",
            "redis+sentinel://s1:26379/svc?db=x",
            "redis+sentinel://s1:26379/svc?ssl=maybe",
            "redis+sentinel://s1:26379/svc?sentinel_password=t0p",
        ],
    )
    def test_bad_urls(self, url: str) -> None:
        with pytest.raises(ValueError, match="URL"):
            redis_ledger_from_url(url)
