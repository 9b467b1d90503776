"""The Sentinel ledger on real processes: a primary, its replica and a Sentinel
(``tests/redis_cluster.py``), each test on a fresh deployment.

The failover test kills the primary with SIGKILL: while no primary answers, the ledger raises
``LedgerUnavailable`` (the middleware's fail mode takes it from there) and settlements wait in the
finalizer's queue; once Sentinel has promoted the replica, the same ledger reaches it by itself and
the queued settlements are applied exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from budget_middleware.finalizer import Finalizer
from budget_middleware.ledger import (
    LedgerUnavailable,
    RedisSentinelLedger,
    Usage,
    new_reservation_id,
    redis_ledger_from_url,
)
from redis_cluster import RedisSentinelServers, wait_until
from redis_server import free_port
from test_ledger import admit, budget, eventually, hold, settle, settlement, usage

pytestmark = pytest.mark.redis

FAILOVER_DEADLINE_S = 20.0


@pytest.fixture
def sentinel() -> Iterator[RedisSentinelServers]:
    """A primary, a replica and one Sentinel (quorum 1, down after 1 s)."""
    servers = RedisSentinelServers(sentinels=1).start()
    try:
        yield servers
    finally:
        servers.stop()


def wait_replicated(servers: RedisSentinelServers) -> None:
    """Until the replica has every write of the primary (so a failover loses nothing)."""
    primary = servers.node(servers.primary_port())
    replica = next(n for n in servers.data if n is not primary)

    def caught_up() -> bool:
        with primary.client() as p, replica.client() as r:
            offset = int(p.info("replication")["master_repl_offset"])
            return int(r.info("replication")["slave_repl_offset"]) >= offset

    wait_until("replica caught up", caught_up, within=5.0)


async def test_ledger_through_sentinel(sentinel: RedisSentinelServers) -> None:
    # A Sentinel that is down, first in the list: the client asks the next one.
    url = sentinel.url.replace("://", f"://127.0.0.1:{free_port()},")
    ledger = redis_ledger_from_url(url, socket_timeout=2.0)
    assert isinstance(ledger, RedisSentinelLedger)
    assert len(ledger._sentinels) == 2
    acknowledged = RedisSentinelLedger(sentinel.url, wait_replicas=1, socket_timeout=2.0)
    try:
        b = budget()
        r = await admit(ledger, hold(b, 100, 30))
        assert (await usage(ledger, b)).held == 30
        assert (await settle(ledger, r, 12)).outcome == "applied"
        assert (await settle(ledger, r, 12)).outcome == "duplicate"
        # Batches wait for the replica to acknowledge them.
        r2 = await admit(acknowledged, hold(b, 100, 10))
        assert [s.outcome for s in await acknowledged.settle_many([settlement(r2, 5)])] == ["applied"]
        u = await usage(ledger, b)
        assert (u.spent, u.held, u.holds) == (17, 0, 0)
        # The ledger wrote to the primary Sentinel names.
        with sentinel.node(sentinel.primary_port()).client() as c:
            assert c.info("replication")["role"] == "master"
            assert c.dbsize() > 0
    finally:
        await ledger.aclose()
        await acknowledged.aclose()


async def test_failover_unavailable_then_recovered_with_queued_settlements(
    sentinel: RedisSentinelServers,
) -> None:
    ledger = RedisSentinelLedger(sentinel.url, socket_timeout=1.0)
    finalizer = Finalizer(ledger, timeout_ms=1_000, retry_base_s=0.05, retry_cap_s=0.25)
    finalizer.ensure_running()
    b = budget()
    try:
        await settle(ledger, await admit(ledger, hold(b, 100, 5)), 5)
        r1 = await admit(ledger, hold(b, 100, 10))
        r2 = await admit(ledger, hold(b, 100, 20))
        await asyncio.to_thread(wait_replicated, sentinel)

        old = sentinel.kill_primary()
        killed = time.monotonic()
        # No primary: every call fails fast with LedgerUnavailable (Sentinel still names the dead
        # primary for a second, then none until the replica is promoted).
        with pytest.raises(LedgerUnavailable):
            await ledger.reserve(new_reservation_id(), [hold(b, 100, 1)], 60_000)
        with pytest.raises(LedgerUnavailable):
            await ledger.usage(b, 100)
        # Settlements handed over meanwhile wait in the finalizer, which keeps retrying.
        finalizer.submit(settlement(r1, 7))
        finalizer.submit(settlement(r2, 15))
        await asyncio.sleep(0.3)
        assert finalizer.applied == 0
        assert finalizer.pending > 0

        new = await asyncio.to_thread(sentinel.wait_failover, old, FAILOVER_DEADLINE_S)
        assert new != old

        async def probe() -> Usage | None:
            try:
                return await ledger.usage(b, 100)
            except LedgerUnavailable:
                return None

        # The same ledger reaches the new primary by itself, and the queue drains into it.
        await eventually(probe, lambda u: u is not None, within=FAILOVER_DEADLINE_S, interval=0.1)
        assert await finalizer.wait_idle(10.0)
        assert time.monotonic() - killed < FAILOVER_DEADLINE_S + 10
        assert finalizer.applied == 2
        assert finalizer.lost == 0
        u = await usage(ledger, b)
        assert (u.spent, u.held, u.holds) == (5 + 7 + 15, 0, 0)
        # Settled once: a retry of either is a duplicate, and new requests are admitted.
        assert (await settle(ledger, r1, 7)).outcome == "duplicate"
        r3 = await admit(ledger, hold(b, 100, 50))
        await settle(ledger, r3, 1)
        assert (await usage(ledger, b)).spent == 28
        with sentinel.node(new).client() as c:
            assert c.info("replication")["role"] == "master"
    finally:
        assert await finalizer.drain(5.0) == 0
        await ledger.aclose()
