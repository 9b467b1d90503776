"""The Redis ledger: one Lua script per operation, one hash per budget.

Scripts are package data (``lua/*.lua``), prefixed with ``lua/_common.lua``, called by EVALSHA and
loaded again on NOSCRIPT (after a restart or failover). Time comes from Redis ``TIME`` inside the
scripts, so replicas with skewed clocks agree on windows and leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..amounts import check_micros
from ..budgets import Budget, KeyLayout
from ._types import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    LedgerUnavailable,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    Usage,
    Violation,
    check_lease,
)
from .urls import check_redis_url, redact_url

__all__ = ["RedisLedger"]

logger = logging.getLogger("budget_middleware")

DAY_MS = 86_400_000
_OUTCOMES: frozenset[str] = frozenset({"applied", "late", "recovered", "duplicate", "stale"})


class _Script:
    __slots__ = ("head", "name", "sha", "source")

    def __init__(self, name: str, prelude: str, helpers: str) -> None:
        body = resources.files(__package__).joinpath(f"lua/{name}.lua").read_text("utf-8")
        self.name = name
        self.source = prelude + "\n" + _include_helpers(body, helpers)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self.head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode() + b"\r\n"


def _bulk(value: str | int) -> bytes:
    data = value.encode() if isinstance(value, str) else b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_command(*args: str | int) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


def pack_evalsha(script: _Script, keys: list[str], args: list[Any]) -> bytes:
    """One EVALSHA in the Redis protocol (RESP). Our arguments are only ``str`` and ``int``.

    Keys, ids and numbers are ASCII (keys are sanitised, ids hex), so the bulk strings are built
    as text and encoded once, where a character counts one byte; anything else is packed per value.
    """
    body = "".join([f"${len(v)}\r\n{v}\r\n" for v in map(str, (*keys, *args))])
    body_bytes = body.encode() if body.isascii() else b"".join(map(_bulk, (*keys, *args)))
    return b"*%d\r\n%b%b%b" % (3 + len(keys) + len(args), script.head, _bulk(len(keys)), body_bytes)


_INCLUDE_HELPERS = "-- #include _helpers.lua\n"


def _include_helpers(body: str, helpers: str) -> str:
    """``body`` with the helper functions where its include line is, or before it all."""
    if body.count(_INCLUDE_HELPERS) > 1:
        raise ValueError("a script includes its helpers once")
    if _INCLUDE_HELPERS in body:
        return body.replace(_INCLUDE_HELPERS, helpers)
    return helpers + "\n" + body


def _load_scripts() -> dict[str, _Script]:
    lua = resources.files(__package__).joinpath("lua")
    prelude = lua.joinpath("_common.lua").read_text("utf-8")
    helpers = lua.joinpath("_helpers.lua").read_text("utf-8")
    names = ("reserve", "settle", "extend", "usage", "reset", "limit")
    return {n: _Script(n, prelude, helpers) for n in names}


def _common_reserve_result(
    reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int, reply: str
) -> Reservation | Rejection:
    """The reply of one budget's common case (reserve.lua): a string of what the script read,
    '<status> <TIME s> <TIME us> <limit override or -> <held> <spent> <epoch>', from which the
    limit and what remains are worked out as the script did (the epoch holds a reservation id,
    which may be any string: it comes last)."""
    try:
        (h,) = holds
        status, seconds, micros, override, held_text, spent_text, epoch = reply.split(" ", 6)
        now = int(seconds) * 1000 + int(micros) // 1000
        limit = h.limit if override == "-" else int(override)
        held, spent = max(0, int(held_text)), int(spent_text)
    except ValueError:
        raise LedgerError(f"unexpected reserve reply {reply!r}") from None
    budget = h.budget
    window = budget.window_of(now)
    if status == "0":
        violation = Violation(budget, limit, spent, held, h.amount, budget.reset_ms(window), now)
        return Rejection(reservation_id, (violation,), 0, ())
    remaining = limit - spent - held - h.amount
    hold = HeldBudget(budget, h.amount, window, epoch, limit, remaining, budget.reset_ms(window), now)
    return Reservation(reservation_id, (hold,), lease_ms, now, 0, (), False)


@dataclass(slots=True)
class _UsageStep:
    """One call of usage.lua: the budget's state (``holds`` the live holds of this call's batch),
    whether a purge pass is still under way, and the count's next cursor ('' for no count)."""

    usage: Usage
    under_way: bool
    cursor: str


def _wrap(exc: BaseException) -> LedgerError:
    if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)):
        return LedgerUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, (rexc.ClusterDownError, rexc.TryAgainError, rexc.ReadOnlyError)):
        return LedgerUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")
    return LedgerError(f"redis error: {type(exc).__name__}: {exc}")


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
        self._scripts = _load_scripts()
        self._checked = False
        self.coalesce = coalesce
        self._key_cache: dict[Budget, str] = {}
        self.max_connections = max_connections
        self._reserve_queue: list[tuple[tuple[str, list[str], list[Any]], asyncio.Future[Any]]] = []
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

    async def _eval_many(
        self, calls: list[tuple[str, list[str], list[Any]]], *, wait: bool = True
    ) -> list[Any]:
        """Many script calls in one pipelined round trip (EVALSHA directly: no SCRIPT EXISTS).

        On NOSCRIPT (a restart or failover emptied the script cache) the scripts are loaded and
        only the calls that did not run are sent again. With ``wait_replicas`` set, the batch also
        waits for that many replicas (``WAIT``) unless ``wait`` is false. Returns one result or
        exception per call.
        """
        wait = wait and self.wait_replicas > 0
        if not calls:
            return []
        client = self.client()
        if not self._checked:
            await self.check()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in (0, 1):
            replies = await self._pipeline([calls[i] for i in todo], wait=wait)
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
                    results[i] = _wrap(reply) if isinstance(reply, BaseException) else reply
            if not missing:
                break
            try:
                for name in {calls[i][0] for i in missing}:
                    await client.script_load(self._scripts[name].source)
            except (rexc.RedisError, OSError) as exc:
                raise _wrap(exc) from exc
            todo = missing
        return results

    async def _pipeline(self, calls: list[tuple[str, list[str], list[Any]]], *, wait: bool) -> list[Any]:
        """Writes the calls (and WAIT, when asked) as one packed buffer on one pooled connection,
        then reads a reply or error per command.

        This is what redis-py's pipeline does, without building a command object per call: the
        request path sends one of these per batch of reserves, the finalizer one per batch of
        settlements. Failures are retried as the connection's retry policy says (for a client made
        from a URL: once, on a fresh connection, when the pooled one had gone stale); every script
        is idempotent, so a batch that ran before its connection broke runs again harmlessly.
        """
        payload = b"".join([pack_evalsha(self._scripts[n], k, a) for n, k, a in calls])
        count = len(calls)
        if wait:
            payload += pack_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            count += 1
        pool = self.client().connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (rexc.RedisError, OSError) as exc:
            raise _wrap(exc) from exc

        async def round_trip() -> list[Any]:
            # One deadline for the whole batch instead of a timer per reply.
            async with asyncio.timeout(conn.socket_timeout):
                await conn.send_packed_command(payload)
                replies: list[Any] = []
                for _ in range(count):
                    try:
                        replies.append(await conn.read_response(timeout=math.inf))
                    except rexc.ResponseError as exc:
                        replies.append(exc)
                return replies

        async def drop(_error: Exception) -> None:
            await conn.disconnect()

        try:
            replies: list[Any] = await conn.retry.call_with_retry(round_trip, drop)
            return replies
        except (rexc.RedisError, OSError) as exc:
            await conn.disconnect()
            raise _wrap(exc) from exc
        except BaseException:
            # Cancelled mid-batch: replies may be left unread, so the connection is not reused.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def _key(self, budget: Budget) -> str:
        """The budget's hash (cached: budgets repeat across requests)."""
        key = self._key_cache.get(budget)
        if key is None:
            if len(self._key_cache) >= 8192:
                self._key_cache.clear()
            key = self._key_cache[budget] = self.layout.key(budget)
        return key

    # -- operations ----------------------------------------------------------------------------

    def _reserve_call(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> tuple[str, list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = ["h:" + reservation_id, lease_ms, self.horizon_ms]
        for h in holds:
            keys.append(self._key(h.budget))
            args += [h.budget.period_ms, h.limit, h.amount]
        return "reserve", keys, args

    def _reserve_result(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int, reply: Any
    ) -> Reservation | Rejection:
        if isinstance(reply, str):
            return _common_reserve_result(reservation_id, holds, lease_ms, reply)
        # One flat array: status, now, k, k expired ids, then a row per budget (reserve.lua).
        status, now, k = int(reply[0]), int(reply[1]), int(reply[2])
        expired = tuple(str(x) for x in reply[3 : 3 + k])
        width = 4 if status == 0 else 3
        rows = [reply[i : i + width] for i in range(3 + k, len(reply), width)]
        if len(rows) != len(holds):
            raise LedgerError(f"unexpected reserve reply {reply!r}")
        if status == 0:
            violations = tuple(
                Violation(
                    h.budget,
                    int(limit),
                    int(spent),
                    int(held),
                    h.amount,
                    h.budget.reset_ms(h.budget.window_of(now)),
                    now,
                )
                for h, (limit, spent, held, ok) in zip(holds, rows, strict=True)
                if not ok
            )
            return Rejection(reservation_id, violations, k, expired)
        held = tuple(
            HeldBudget(
                h.budget,
                h.amount,
                window := h.budget.window_of(now),
                str(epoch),
                int(limit),
                int(remaining),
                h.budget.reset_ms(window),
                now,
            )
            for h, (epoch, limit, remaining) in zip(holds, rows, strict=True)
        )
        return Reservation(reservation_id, held, lease_ms, now, k, expired, status == 2)

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
        return self._reserve_result(reservation_id, holds, lease_ms, reply)

    async def _coalesced(self, call: tuple[str, list[str], list[Any]]) -> Any:
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

    def _settle_call(self, s: Settlement) -> tuple[str, list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [
            "h:" + s.reservation_id,
            s.actual,
            self.horizon_ms,
        ]
        for hb in s.holds:
            keys.append(self._key(hb.budget))
            spent_field = f"s:{hb.window}" if hb.window >= 0 else ""
            args += [spent_field, hb.epoch, hb.budget.period_ms, hb.reserved_ms]
        return "settle", keys, args

    @staticmethod
    def _settled(s: Settlement, reply: Any) -> Settled:
        outcomes = tuple(str(reply).split(" "))
        if not all(o in _OUTCOMES for o in outcomes):
            raise LedgerError(f"unexpected settle reply {reply!r}")
        return Settled(s.reservation_id, outcomes)  # type: ignore[arg-type]

    async def settle(self, settlement: Settlement) -> Settled:
        (result,) = await self.settle_many([settlement])
        return result

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        """Settle a batch in one round trip. Raises if any settle failed (all are idempotent)."""
        calls = [self._settle_call(s) for s in settlements if s.holds]
        replies = iter(await self._eval_many(calls))
        out: list[Settled] = []
        for s in settlements:
            if not s.holds:
                out.append(Settled(s.reservation_id, ()))
                continue
            reply = next(replies)
            if isinstance(reply, BaseException):
                raise reply
            out.append(self._settled(s, reply))
        return out

    async def extend(self, reservations: Sequence[Reservation], lease_ms: int) -> Renewed:
        check_lease(lease_ms, self.horizon_ms)
        calls: list[tuple[str, list[str], list[Any]]] = []
        for r in reservations:
            keys = [self._key(hb.budget) for hb in r.holds]
            if keys:
                calls.append(("extend", keys, [r.id, lease_ms, self.horizon_ms]))
        renewed = reheld = missing = 0
        for reply in await self._eval_many(calls):
            if isinstance(reply, BaseException):
                raise reply
            renewed += int(reply[0])
            reheld += int(reply[1])
            missing += int(reply[2])
        return Renewed(renewed, reheld, missing)

    async def _usage_step(self, budget: Budget, limit: int, count_from: str) -> _UsageStep:
        """One call of usage.lua: a step of the purge pass when one is due, then (unless
        ``count_from`` is '') one batch of the count of live holds from that HSCAN cursor."""
        args = [budget.period_ms, limit, self.horizon_ms, count_from]
        reply = await self._eval("usage", [self._key(budget)], args)
        try:
            now, window, eff_limit, spent, held, purged, under_way, live, cursor = reply
            window = int(window)
            usage = Usage(
                budget,
                int(eff_limit),
                int(spent),
                int(held),
                int(live),
                window,
                budget.reset_ms(window),
                int(now),
                int(purged),
            )
        except (TypeError, ValueError):
            raise LedgerError(f"unexpected usage reply {reply!r}") from None
        return _UsageStep(usage, bool(int(under_way)), str(cursor))

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
