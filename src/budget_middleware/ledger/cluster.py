"""The Redis ledger on Redis Cluster: ``redis+cluster://host:port[,host:port...]``.

Every key of one budget shares a ``{rule:entity}`` hash tag, so each budget lives in one slot and
every script call touches one slot. A reservation whose budgets live in different slots is reserved
slot by slot (see ``RedisClusterLedger``); settlements and renewals are split by slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot

from ..budgets import Budget
from ._cluster_transport import CLUSTER_ERRORS, run_on_node, wrap_cluster
from ._transport import Call
from ._types import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    LedgerUnavailable,
    Rejection,
    Reservation,
    Settled,
    Settlement,
    Violation,
    admits,
    check_lease,
)
from .redis import RedisLedger
from .urls import parse_cluster_url

__all__ = ["RedisClusterLedger"]

logger = logging.getLogger("budget_middleware")


@dataclass
class _LoopState:
    """Per event loop: the gate on concurrent round trips, and multi-slot settles in flight."""

    gate: asyncio.Semaphore
    settling: dict[str, asyncio.Future[None]] = field(default_factory=dict)


class RedisClusterLedger(RedisLedger):
    """A ledger on Redis Cluster (``redis+cluster://host:port[,host:port...]``).

    Each budget lives in one slot, and every operation on budgets of one slot is one atomic script,
    exactly as on a standalone Redis. A reservation whose budgets live in different slots has a
    **weaker guarantee**:

    * Its holds are grouped by slot and the groups are reserved one after another, each group one
      atomic script, in one order for every request: the tightest limit first, then by slot. When
      a later group is rejected (or fails), the groups already held are released again (a
      release-only settle: window -1, actual 0) before the ``Rejection`` is returned (or the error
      raised); a reserve cancelled between groups releases them in the background. Meanwhile
      those holds were visible, so a concurrent request may be refused by a hold that is then
      released: the cluster can refuse more than one Redis would (in a burst of requests spanning
      slots, noticeably more), never admit more: no budget goes over its limit.
    * A ``Rejection`` lists the violations of the group that refused and of the groups after it
      (read with ``usage``, not under one snapshot); the groups before it had admitted.
    * If the release itself fails, the reserve raises ``LedgerUnavailable``: the caller must
      release the reservation, as the middleware does for every reserve that raised. Holds never
      released expire with their lease.
    * A settlement or lease renewal spanning several slots is split into one call per slot, sent
      concurrently; a settle is still exactly once per budget, but a failure can leave some slots
      settled and others not until the (idempotent) retry. Two concurrent settles of the same
      multi-slot reservation in one process are serialised, so exactly one of them reports
      ``applied``; across processes each slot still applies the spend once.
    * With ``wait_replicas``, ``WAIT`` runs on every primary a batch wrote to, on the connection
      that wrote; a call redirected by ``MOVED``/``ASK`` mid-batch is not covered by that ``WAIT``.

    Calls are pipelined per primary and the primaries are served concurrently; a ``NOSCRIPT``
    (a primary restarted or promoted after a failover) loads the script on the node that owns the
    slot and retries once. Reserves made in one event-loop turn are still coalesced.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: RedisCluster | None = None,
        retries: int = 3,
        **options: Any,
    ) -> None:
        self._nodes: tuple[tuple[str, int], ...] = ()
        self._options: dict[str, Any] = {}
        if url is not None:
            parsed = parse_cluster_url(url)
            self._nodes = parsed.hosts
            self._options = parsed.connection_options()
        self.retries = retries
        super().__init__(url, client=cast(Any, client), **options)
        self._state_key: tuple[int, int] | None = None
        self._loop_state: _LoopState | None = None

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> aioredis.Redis:
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
            decode_responses=True,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            health_check_interval=30,
            # The gate below bounds round trips in flight to max_connections; a round trip holds at
            # most one connection per node, a NOSCRIPT reload or a redirect one more.
            max_connections=2 * self.max_connections,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), self.retries),
            **self._options,
        )
        return cast("aioredis.Redis", cluster)

    def cluster(self) -> RedisCluster:
        """The cluster client for this process and event loop."""
        return cast(RedisCluster, self.client())

    def _state(self) -> _LoopState:
        key = (os.getpid(), id(asyncio.get_running_loop()))
        if self._loop_state is None or self._state_key != key:
            # redis-py's cluster client raises instead of waiting when a node's connections run
            # out; this gate makes a burst wait, as the standalone ledger's blocking pool does.
            self._loop_state = _LoopState(asyncio.Semaphore(self.max_connections))
            self._state_key = key
        return self._loop_state

    async def check(self) -> None:
        """Warn when a primary may evict budget keys (``maxmemory-policy`` not ``noeviction``)."""
        self._checked = True
        try:
            replies = await self.cluster().config_get(
                "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
            )
        except CLUSTER_ERRORS as exc:
            logger.warning(
                "budget: could not read maxmemory-policy of the cluster's primaries (%s); they must "
                "run with maxmemory-policy noeviction or budgets can be evicted and reset",
                exc,
            )
            return
        # One reply per primary, keyed by node name (a lone primary's reply comes unwrapped).
        answers: dict[Any, Any] = dict(replies)
        if not all(isinstance(v, dict) for v in answers.values()):
            answers = {"": answers}
        bad = {
            str(node): policy.get("maxmemory-policy")
            for node, policy in answers.items()
            if policy.get("maxmemory-policy") != "noeviction"
        }
        if bad:
            logger.warning(
                "budget: Redis Cluster primaries with a maxmemory-policy other than noeviction: %s; "
                "under memory pressure they may evict holds and spend and budgets reset silently",
                ", ".join(f"{node or 'a primary'}={policy!r}" for node, policy in sorted(bad.items())),
            )

    # -- script calls: pipelined per primary, primaries concurrently -----------------------------

    async def _send(self, calls: list[Call], wait: bool) -> list[Any]:
        """One result (or ``LedgerError``) per call; every call must touch one slot."""
        client = self.cluster()
        async with self._state().gate:
            try:
                await client.initialize()  # a no-op once the slots are known
                by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
                for i, (_, keys, _) in enumerate(calls):
                    node = client.get_node_from_key(keys[0])
                    if node is None:  # pragma: no cover - only for replica=True
                        raise rexc.SlotNotCoveredError(  # type: ignore[no-untyped-call, unused-ignore]
                            f"no node serves key {keys[0]!r}"
                        )
                    by_node.setdefault(node.name, (node, []))[1].append(i)
            except CLUSTER_ERRORS as exc:
                raise wrap_cluster(exc) from exc
            groups = list(by_node.values())
            replies = await asyncio.gather(
                *(self._run_on(client, node, [calls[i] for i in idx], wait) for node, idx in groups),
                return_exceptions=True,
            )
        results: list[Any] = [None] * len(calls)
        for (_, idx), reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                for i in idx:
                    results[i] = wrap_cluster(reply)
            else:
                for i, result in zip(idx, reply, strict=True):
                    results[i] = result
        return results

    async def _run_on(
        self, client: RedisCluster, node: ClusterNode, calls: list[Call], wait: bool
    ) -> list[Any]:
        """The calls whose slots ``node`` serves, in one pipeline (and WAIT, when asked)."""
        replicas = (self.wait_replicas, self.wait_timeout_ms) if wait else None
        return await run_on_node(client, self._scripts, node, calls, replicas)

    # -- slots ---------------------------------------------------------------------------------

    def slot(self, budget: Budget) -> int:
        """The cluster slot of ``budget``'s keys."""
        return int(key_slot(self.layout.key(budget).encode()))

    def _split(self, holds: Sequence[HeldBudget | HoldRequest]) -> list[list[int]] | None:
        """Indices of ``holds`` grouped by slot, groups in order of first appearance; None when
        they all live in one slot (one call)."""
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(holds):
            groups.setdefault(self.slot(h.budget), []).append(i)
        return list(groups.values()) if len(groups) > 1 else None

    # -- operations ----------------------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection:
        if not holds:
            raise ValueError("reserve needs at least one hold")
        check_lease(lease_ms, self.horizon_ms)
        groups = self._split(holds)
        if groups is None:
            return await super().reserve(reservation_id, holds, lease_ms)
        # The tightest limit first, then by slot: one order for every request, so concurrent
        # requests meet on the budget most likely to refuse before holding anything elsewhere
        # (in a burst this admits nearly as much as one atomic script; hold order admits far less).
        groups.sort(key=lambda g: (min(holds[i].limit for i in g), self.slot(holds[g[0]].budget)))
        taken: list[tuple[list[int], Reservation]] = []
        for n, group in enumerate(groups):
            part = [holds[i] for i in group]
            try:
                result = await super().reserve(reservation_id, part, lease_ms)
            except LedgerError as exc:
                # This group's script may have run: release it with the groups already held.
                done = [i for g, _ in taken for i in g]
                await self._release_or_raise(reservation_id, holds, done, group, exc)
                raise
            except BaseException:
                # Cancelled: release in the background (the caller may not await any more).
                self._release_later(reservation_id, holds, [*(i for g, _ in taken for i in g), *group])
                raise
            if isinstance(result, Rejection):
                done = [i for g, _ in taken for i in g]
                await self._release_or_raise(reservation_id, holds, done, [], None)
                return await self._rejection(reservation_id, holds, groups[n:], result, taken)
            taken.append((group, result))
        held: list[HeldBudget | None] = [None] * len(holds)
        for group, r in taken:
            for i, hb in zip(group, r.holds, strict=True):
                held[i] = hb
        reservations = [r for _, r in taken]
        return Reservation(
            reservation_id,
            tuple(hb for hb in held if hb is not None),
            lease_ms,
            min(r.now_ms for r in reservations),
            sum(r.purged for r in reservations),
            tuple(x for r in reservations for x in r.expired_ids),
            all(r.replayed for r in reservations),
        )

    async def _rejection(
        self,
        reservation_id: str,
        holds: Sequence[HoldRequest],
        rest: list[list[int]],
        refused: Rejection,
        taken: list[tuple[list[int], Reservation]],
    ) -> Rejection:
        """The refusing group's violations, and those of the groups after it (read, not held)."""
        found: dict[int, Violation] = {}
        pending = list(refused.violations)
        for i in rest[0]:
            if pending and pending[0].budget == holds[i].budget:
                found[i] = pending.pop(0)
        later = [i for g in rest[1:] for i in g]
        # One bounded step each (what a reserve would read), not a whole usage: this is the
        # request path.
        steps = await asyncio.gather(
            *(self._usage_step(holds[i].budget, holds[i].limit, "") for i in later),
            return_exceptions=True,
        )
        usages = [s if isinstance(s, BaseException) else s.usage for s in steps]
        purged = refused.purged + sum(r.purged for _, r in taken)
        for i, u in zip(later, usages, strict=True):
            if isinstance(u, BaseException):
                if not isinstance(u, Exception):
                    raise u
                continue  # best effort: the refusing group's violations are the answer
            amount = holds[i].amount
            purged += u.purged
            if not admits(u.limit, u.spent, u.held, amount):
                found[i] = Violation(
                    holds[i].budget, u.limit, u.spent, u.held, amount, u.reset_ms, u.now_ms
                )
        violations = tuple(found[i] for i in sorted(found)) or refused.violations
        expired = tuple(x for _, r in taken for x in r.expired_ids) + refused.expired_ids
        return Rejection(reservation_id, violations, purged, expired)

    @staticmethod
    def _blind(reservation_id: str, holds: Sequence[HoldRequest], idx: list[int]) -> Settlement:
        """A release-only settlement: window -1, no epoch, actual 0 (removes what it finds)."""
        released = tuple(
            HeldBudget(holds[i].budget, holds[i].amount, -1, "", holds[i].limit, 0, None) for i in idx
        )
        return Settlement(reservation_id, released, 0, "release-partial")

    async def _release_or_raise(
        self,
        reservation_id: str,
        holds: Sequence[HoldRequest],
        held: list[int],
        unknown: list[int],
        cause: LedgerError | None,
    ) -> None:
        """Release the groups ``held`` (and, best effort, the group ``unknown`` whose reply was lost).

        Raises ``LedgerUnavailable`` when the held groups could not be released. The unknown group
        is released separately: it may sit on the node that just failed.
        """
        calls = [self.settle_many([self._blind(reservation_id, holds, held)])] if held else []
        if unknown:
            calls.append(self.settle_many([self._blind(reservation_id, holds, unknown)]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        # A failure on one node can make redis-py reset the whole cluster client, so the release
        # to a healthy node may fail once with it: try that release again a few times, briefly.
        for delay in (0.05, 0.2, 0.5):
            if not (held and isinstance(results[0], LedgerUnavailable)):
                break
            await asyncio.sleep(delay)
            retry = await asyncio.gather(
                self.settle_many([self._blind(reservation_id, holds, held)]),
                return_exceptions=True,
            )
            if isinstance(retry[0], BaseException) and not isinstance(retry[0], Exception):
                raise retry[0]
            results[0] = retry[0]
        if held and isinstance(results[0], Exception):
            logger.warning(
                "budget: could not release the holds of reservation %s on other slots (%s)",
                reservation_id,
                results[0],
            )
            raise LedgerUnavailable(
                f"reservation {reservation_id} was refused or failed on one slot and its holds on "
                f"other slots could not be released: {results[0]}"
            ) from (cause or results[0])

    def _release_later(self, reservation_id: str, holds: Sequence[HoldRequest], idx: list[int]) -> None:
        """Release after a cancelled reserve, once the coalesced reserves in flight have landed
        (the cancelled group's script may still be on its way: released before it, its hold
        would stay until its lease ends)."""
        in_flight = set(self._flushes)

        async def release() -> None:
            with contextlib.suppress(Exception):
                if in_flight:
                    await asyncio.wait(in_flight, timeout=max(self._socket_timeout or 5.0, 1.0) * 2)
                await self.settle_many([self._blind(reservation_id, holds, idx)])

        task = asyncio.get_running_loop().create_task(release())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        """Settle a batch; a settlement spanning several slots is one call per slot, and settles of
        the same such reservation in this process go one after another (``_one_at_a_time``).

        Raises if any call failed (every call is idempotent: retry the batch).
        """
        multi = {s.reservation_id for s in settlements if self._split(s.holds) is not None}
        async with self._one_at_a_time(multi):
            return await super().settle_many(settlements)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, reservation_ids: set[str]) -> AsyncIterator[None]:
        """Serialise settles of the same multi-slot reservations in this process and loop.

        Split per slot, two racing settles could each win one slot and both report ``applied``;
        queued behind the first, the second finds every slot settled.
        """
        if not reservation_ids:
            yield
            return
        state = self._state()
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before = {state.settling[r] for r in reservation_ids if r in state.settling}
        for r in reservation_ids:
            state.settling[r] = mine
        try:
            if before:
                await asyncio.wait(before)
            yield
        finally:
            if not mine.done():
                mine.set_result(None)
            for r in reservation_ids:
                if state.settling.get(r) is mine:
                    del state.settling[r]
