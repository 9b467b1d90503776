"""The Redis ledger: one Lua script per operation, one hash per budget.

Scripts are package data (``lua/*.lua``), prefixed with ``lua/_common.lua``, called by EVALSHA and
loaded again on NOSCRIPT (after a restart or failover). Time comes from Redis ``TIME`` inside the
scripts, so replicas with skewed clocks agree on windows and leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..amounts import check_micros
from ..budgets import Budget, KeyLayout
from ._replies import UsageStep, reserve_result, settled, usage_step
from ._transport import Call, load_scripts, pack_command, pack_evalsha, round_trip, wrap
from ._types import (
    HeldBudget,
    HoldRequest,
    LedgerNotSent,
    LedgerUnavailable,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    SettleOutcome,
    Usage,
    check_lease,
)
from .urls import check_redis_url, redact_url

__all__ = ["RedisLedger"]

logger = logging.getLogger("budget_middleware")

DAY_MS = 86_400_000


class RedisLedger:
    """A ledger in Redis (standalone or Sentinel; ``cluster=True`` groups budgets by slot).

    Pass a ``url`` and the client is made per event loop, lazily (never shared across a fork or a
    loop), or pass a ready ``client`` you own.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "budget",
        horizon_ms: int = DAY_MS,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        socket_timeout: float | None = 5.0,
        coalesce: bool = True,
        max_connections: int = 64,
    ) -> None:
        if url is None and client is None:
            raise ValueError("RedisLedger needs a url or a client")
        if url is not None:
            check_redis_url(url)
        self.url = url
        self.layout = KeyLayout(prefix)
        self.horizon_ms = horizon_ms
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._socket_timeout = socket_timeout
        self._own_client = client is None
        self._client = client
        self._client_key: tuple[int, int] | None = None if client is None else (os.getpid(), 0)
        self._scripts = load_scripts()
        self._checked = False
        self.coalesce = coalesce
        self._key_cache: dict[Budget, str] = {}
        self.max_connections = max_connections
        self._reserve_queue: list[tuple[Call, asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url) if self.url else 'client'!r})"

    # -- connection ----------------------------------------------------------------------------

    def client(self) -> aioredis.Redis:
        """The client for this process and event loop."""
        if not self._own_client:
            assert self._client is not None
            return self._client
        key = (os.getpid(), id(asyncio.get_running_loop()))
        if self._client is None or self._client_key != key:
            self._client = self._connect()
            self._client_key = key
            self._checked = False
        return self._client

    def _connect(self) -> aioredis.Redis:
        """Make a client from ``self.url``; Sentinel and Cluster ledgers override this."""
        assert self.url is not None
        # A blocking pool: under a burst, callers wait for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self._socket_timeout,
            decode_responses=True,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            health_check_interval=30,
            # A pooled connection to a Redis that restarted fails once on first use: retry it on
            # a fresh connection. Safe because every script is idempotent.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[rexc.ConnectionError],
        )
        return aioredis.Redis.from_pool(pool)

    async def check(self) -> None:
        """Warn loudly when Redis may evict budget keys (``maxmemory-policy`` not ``noeviction``)."""
        self._checked = True
        try:
            policy = await self.client().config_get("maxmemory-policy")
        except rexc.RedisError as exc:
            logger.warning(
                "budget: could not read maxmemory-policy (%s); Redis must run with "
                "maxmemory-policy noeviction or budgets can be evicted and reset",
                exc,
            )
            return
        value = policy.get("maxmemory-policy")
        if value != "noeviction":
            logger.warning(
                "budget: Redis maxmemory-policy is %r; run it with noeviction, otherwise under "
                "memory pressure Redis may evict holds and spend and budgets reset silently",
                value,
            )

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """One script call; unlike a batch it does not wait for replicas."""
        (reply,) = await self._eval_many([(name, keys, args)], wait=False)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _eval_many(self, calls: list[Call], *, wait: bool = True) -> list[Any]:
        """Many script calls in as few round trips as the store allows (EVALSHA directly: no SCRIPT
        EXISTS). With ``wait_replicas`` set, the batch also waits for that many replicas
        (``WAIT``) unless ``wait`` is false. Returns one result or ``LedgerError`` per call."""
        if not calls:
            return []
        self.client()  # this loop's client: a new one is checked again
        if not self._checked:
            await self.check()
        return await self._send(calls, wait and self.wait_replicas > 0)

    # -- the hooks where the stores differ (RedisClusterLedger overrides them) -------------------

    async def _send(self, calls: list[Call], wait: bool) -> list[Any]:
        """The calls in one pipelined round trip. On NOSCRIPT (a restart or failover emptied the
        script cache) the scripts are loaded and only the calls that did not run are sent again."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in (0, 1):
            try:
                replies = await self._pipeline([calls[i] for i in todo], wait=wait)
            except LedgerNotSent as exc:
                if attempt == 0 or len(todo) == len(calls):
                    raise
                # The first round ran some of the calls: the batch as a whole did reach the store.
                raise LedgerUnavailable(str(exc)) from exc
            if wait:
                acked = replies.pop()
                if isinstance(acked, int) and acked < self.wait_replicas:
                    raise LedgerUnavailable(
                        f"only {acked} of {self.wait_replicas} replicas acknowledged the batch"
                    )
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if attempt == 0 and isinstance(reply, rexc.NoScriptError):
                    missing.append(i)
                else:
                    results[i] = wrap(reply) if isinstance(reply, BaseException) else reply
            if not missing:
                break
            try:
                for name in {calls[i][0] for i in missing}:
                    await self.client().script_load(self._scripts[name].source)
            except (rexc.RedisError, OSError) as exc:
                raise wrap(exc) from exc
            todo = missing
        return results

    def _split(self, holds: Sequence[HeldBudget | HoldRequest]) -> list[list[int]] | None:
        """How the budgets of ``holds`` must be split across script calls: None for one call (every
        budget of a standalone Redis is in reach of one script), else the indices of each part."""
        return None

    async def _pipeline(self, calls: list[Call], *, wait: bool) -> list[Any]:
        """The calls (and WAIT, when asked) in one round trip on one pooled connection: the
        request path sends one of these per batch of reserves, the finalizer one per batch of
        settlements."""
        payload = b"".join([pack_evalsha(self._scripts[n], k, a) for n, k, a in calls])
        count = len(calls)
        if wait:
            payload += pack_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            count += 1
        return await round_trip(self.client().connection_pool, payload, count)

    def _key(self, budget: Budget) -> str:
        """The budget's hash (cached: budgets repeat across requests)."""
        key = self._key_cache.get(budget)
        if key is None:
            if len(self._key_cache) >= 8192:
                self._key_cache.clear()
            key = self._key_cache[budget] = self.layout.key(budget)
        return key

    # -- operations ----------------------------------------------------------------------------

    def _reserve_call(self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int) -> Call:
        keys: list[str] = []
        args: list[Any] = ["h:" + reservation_id, lease_ms, self.horizon_ms]
        for h in holds:
            keys.append(self._key(h.budget))
            args += [h.budget.period_ms, h.limit, h.amount]
        return "reserve", keys, args

    async def reserve(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection:
        if not holds:
            raise ValueError("reserve needs at least one hold")
        check_lease(lease_ms, self.horizon_ms)
        call = self._reserve_call(reservation_id, holds, lease_ms)
        if self.coalesce:
            reply = await self._coalesced(call)
        else:
            reply = await self._eval(*call)
        return reserve_result(reservation_id, holds, lease_ms, reply)

    async def _coalesced(self, call: Call) -> Any:
        """Reserves made in one event-loop turn go out together in one pipelined round trip.

        Each stays its own atomic script. A caller cancelled while waiting leaves its script to
        run; the middleware releases such a reserve, as it does any reserve whose reply is lost.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._reserve_queue.append((call, future))
        if len(self._reserve_queue) == 1:
            loop.call_soon(self._start_reserve_flush)
        return await future

    def _start_reserve_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_reserves())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush_reserves(self) -> None:
        queued, self._reserve_queue = self._reserve_queue, []
        try:
            replies = await self._eval_many([call for call, _ in queued])
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else LedgerUnavailable("reserve cancelled")
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(queued, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _settle_call(self, s: Settlement, holds: Sequence[HeldBudget] | None = None) -> Call:
        """The settle of ``s``, or of ``holds``, a part of its holds."""
        keys: list[str] = []
        args: list[Any] = [
            "h:" + s.reservation_id,
            s.actual,
            self.horizon_ms,
        ]
        for hb in s.holds if holds is None else holds:
            keys.append(self._key(hb.budget))
            spent_field = f"s:{hb.window}" if hb.window >= 0 else ""
            args += [spent_field, hb.epoch, hb.budget.period_ms, hb.reserved_ms]
        return "settle", keys, args

    async def settle(self, settlement: Settlement) -> Settled:
        (result,) = await self.settle_many([settlement])
        return result

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        """Settle a batch in one round trip; a settlement whose budgets the store splits is one call
        per part. Raises if any call failed (every call is idempotent: retry the batch)."""
        calls: list[Call] = []
        # Per settlement: its parts, (call index, indices of its holds or None for all of them).
        plan: list[list[tuple[int, list[int] | None]]] = []
        for s in settlements:
            if not s.holds:
                plan.append([])
                continue
            groups = self._split(s.holds)
            if groups is None:
                plan.append([(len(calls), None)])
                calls.append(self._settle_call(s))
                continue
            plan.append([(len(calls) + n, g) for n, g in enumerate(groups)])
            calls += [self._settle_call(s, [s.holds[i] for i in g]) for g in groups]
        replies = await self._eval_many(calls)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        out: list[Settled] = []
        for s, parts in zip(settlements, plan, strict=True):
            if len(parts) == 1 and parts[0][1] is None:
                out.append(settled(s, replies[parts[0][0]]))
                continue
            outcomes: list[SettleOutcome] = ["duplicate"] * len(s.holds)
            for call, group in parts:
                assert group is not None
                for i, outcome in zip(group, settled(s, replies[call]).outcomes, strict=True):
                    outcomes[i] = outcome
            out.append(Settled(s.reservation_id, tuple(outcomes)))
        return out

    async def extend(self, reservations: Sequence[Reservation], lease_ms: int) -> Renewed:
        """Renew leases; a reservation whose budgets the store splits is one call per part."""
        check_lease(lease_ms, self.horizon_ms)
        calls: list[Call] = []
        for r in reservations:
            if not r.holds:
                continue
            groups = self._split(r.holds)
            parts = [r.holds] if groups is None else [[r.holds[i] for i in g] for g in groups]
            for part in parts:
                keys = [self._key(hb.budget) for hb in part]
                calls.append(("extend", keys, [r.id, lease_ms, self.horizon_ms]))
        renewed = reheld = missing = 0
        for reply in await self._eval_many(calls):
            if isinstance(reply, BaseException):
                raise reply
            renewed += int(reply[0])
            reheld += int(reply[1])
            missing += int(reply[2])
        return Renewed(renewed, reheld, missing)

    async def _usage_step(self, budget: Budget, limit: int, count_from: str) -> UsageStep:
        """One call of usage.lua: a step of the purge pass when one is due, then (unless
        ``count_from`` is '') one batch of the count of live holds from that HSCAN cursor."""
        args = [budget.period_ms, limit, self.horizon_ms, count_from]
        return usage_step(budget, await self._eval("usage", [self._key(budget)], args))

    async def usage(self, budget: Budget, limit: int) -> Usage:
        """The budget's state after the purge pass under way (or due) has run to its end, with its
        live holds counted; every script call does a bounded batch of that work, so a budget of
        many holds costs many short calls, never one long one. Read while other requests run,
        the count is of holds seen by a scan, not a snapshot."""
        step = await self._usage_step(budget, limit, "")
        purged = step.usage.purged
        while step.under_way:
            step = await self._usage_step(budget, limit, "")
            purged += step.usage.purged
        live, cursor = 0, "0"
        while True:
            step = await self._usage_step(budget, limit, cursor)
            purged += step.usage.purged
            live += step.usage.holds
            cursor = step.cursor
            if cursor == "0":
                break
        step.usage.holds = live
        step.usage.purged = purged
        return step.usage

    async def set_limit(self, budget: Budget, limit: int | None) -> None:
        if limit is not None:
            check_micros(limit, what="limit")
        args = ["" if limit is None else limit, budget.period_ms, self.horizon_ms]
        await self._eval("limit", [self._key(budget)], args)

    async def reset(self, budget: Budget) -> None:
        await self._eval("reset", [self._key(budget)], [budget.period_ms, self.horizon_ms])

    async def aclose(self) -> None:
        if self._flushes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*self._flushes, return_exceptions=True), 5)
        if self._own_client and self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except (rexc.RedisError, OSError, RuntimeError):
                pass
