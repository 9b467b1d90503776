"""Faults against a real redis-server: lost replies and retries, outages, secrets, NOSCRIPT.

A lost reply is the hard case of exactly-once: the script ran on the server, the caller saw a
connection error and retries. ``LossyRedis``'s connections let a write run and then raise
``ConnectionError`` instead of returning its replies (or raise before sending, for a request that
never arrived), which the ledger turns into ``LedgerUnavailable`` like any outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from budget_middleware.budgets import Budget
from budget_middleware.ledger import (
    HeldBudget,
    HoldRequest,
    LedgerUnavailable,
    RedisLedger,
    Reservation,
    Settlement,
    new_reservation_id,
    redact_url,
)
from redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

LONG_LEASE_MS = 60_000
T = TypeVar("T")


# -- a client that loses replies ------------------------------------------------------------------


@dataclass
class Fault:
    """Lose the reply of the next write (one command or a pipelined batch) that runs ``sha``.

    ``before=True`` fails the write before it is sent: the request never reached the server.
    ``LossyRedis.lost`` counts the faults that fired, of either kind.
    """

    sha: str
    before: bool = False
    times: int = 1


def split_commands(data: bytes) -> list[bytes]:
    """The RESP commands (arrays of bulk strings) in a packed write, each as its own bytes."""
    commands = []
    at = 0
    while at < len(data):
        start = at
        end = data.index(b"\r\n", at)
        count = int(data[at + 1 : end])
        at = end + 2
        for _ in range(count):
            end = data.index(b"\r\n", at)
            at = end + 2 + int(data[at + 1 : end]) + 2
        commands.append(data[start:at])
    return commands


class LossyConnection(aioredis.Connection):
    """A connection that loses replies as its client's faults say, below the ledger's own code.

    A fault is matched on a write: the ledger's pipelined batches and single commands alike. A
    reply is lost only after every reply of the write was read off the socket (so the commands
    certainly ran), and only when no script answered NOSCRIPT (then nothing ran).
    """

    owner: LossyRedis

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # One plan per write not yet read (redis-py pipelines writes when it connects).
        self._plans: list[tuple[int, int | None, set[str]]] = []
        self._buffered: list[Any] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes) else b"".join(command)
        commands = split_commands(data)
        shas = {sha for sha in self.owner.watched() if sha.encode() in data}
        if self.owner.take_fault(shas, before=True) is not None:
            raise rexc.ConnectionError("injected: request lost before it was sent")
        flush_at = None
        evalshas = sum(1 for c in commands if b"\r\nEVALSHA\r\n" in c[:20])
        if self.owner.flush_mid_batch and evalshas > 1:
            # Another client flushes the script cache after the first command of this batch ran.
            self.owner.flush_mid_batch = False
            flush_at = 1
            commands.insert(flush_at, b"*2\r\n$6\r\nSCRIPT\r\n$5\r\nFLUSH\r\n")
        self._plans.append((len(commands), flush_at, shas))
        await super().send_packed_command(b"".join(commands), check_health)

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self._plans.clear()
        self._buffered.clear()
        await super().disconnect(*args, **kwargs)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if not self._buffered and self._plans:
            count, flush_at, shas = self._plans.pop(0)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await super().read_response(*args, **kwargs))
                except rexc.ResponseError as exc:
                    replies.append(exc)
            if flush_at is not None:
                del replies[flush_at]
            ran = not any(isinstance(r, rexc.NoScriptError) for r in replies)
            if ran and self.owner.take_fault(shas, before=False) is not None:
                raise rexc.ConnectionError("injected: reply lost after the write ran")
            self._buffered = replies
        assert self._buffered, "a reply read that no write asked for"
        reply = self._buffered.pop(0)
        if isinstance(reply, rexc.ResponseError):
            raise reply
        return reply


class LossyRedis(aioredis.Redis):
    """A redis-py asyncio client whose replies can be lost on purpose (see ``LossyConnection``)."""

    faults: list[Fault]
    lost: int
    flush_mid_batch: bool

    def arm(self, sha: str, *, before: bool = False, times: int = 1) -> None:
        self.faults.append(Fault(sha, before, times))

    def watched(self) -> set[str]:
        return {f.sha for f in self.faults}

    def take_fault(self, shas: set[str], *, before: bool) -> Fault | None:
        for fault in self.faults:
            if fault.sha in shas and fault.before == before:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                self.lost += 1
                return fault
        return None


def make_lossy(url: str) -> LossyRedis:
    """A client that never retries on its own: every injected fault reaches the ledger."""
    connection_class = type("BoundLossyConnection", (LossyConnection,), {})
    client = LossyRedis.from_url(
        url, decode_responses=True, connection_class=connection_class, retry=Retry(NoBackoff(), 0)
    )
    connection_class.owner = client
    client.faults = []
    client.lost = 0
    client.flush_mid_batch = False
    return client


def sha(ledger: RedisLedger, script: str) -> str:
    """The EVALSHA digest of one of the ledger's scripts (what the lossy client matches on)."""
    return ledger._scripts[script].sha


@pytest.fixture
async def lossy(redis_url: str) -> AsyncIterator[LossyRedis]:
    client = make_lossy(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def ledger(lossy: LossyRedis) -> AsyncIterator[RedisLedger]:
    ledger = RedisLedger(client=lossy)
    try:
        yield ledger
    finally:
        await ledger.aclose()


# -- helpers --------------------------------------------------------------------------------------


def budget(rule: str = "user", entity: str = "r:alice") -> Budget:
    return Budget(rule, entity, 0)


async def retried(call: Callable[[], Awaitable[T]], attempts: int = 3) -> tuple[T, int]:
    """Call until it answers, as the finalizer does; returns the answer and the failures seen."""
    failures = 0
    for _ in range(attempts):
        try:
            return await call(), failures
        except LedgerUnavailable:
            failures += 1
    raise AssertionError(f"no answer after {attempts} attempts")


async def admit(ledger: RedisLedger, *holds: HoldRequest, lease_ms: int = LONG_LEASE_MS) -> Reservation:
    result = await ledger.reserve(new_reservation_id(), list(holds), lease_ms)
    assert isinstance(result, Reservation), result
    return result


def settlement(r: Reservation, actual: int) -> Settlement:
    return Settlement(r.id, r.holds, actual, "completed")


async def purge_by_another_reserve(ledger: RedisLedger, b: Budget, target: str) -> None:
    """Reserve (and release) on ``b`` until one of those reserves purges ``target``'s hold."""
    deadline = time.monotonic() + 5
    while True:
        r = await ledger.reserve(new_reservation_id(), [HoldRequest(b, 10**9, 0)], LONG_LEASE_MS)
        assert isinstance(r, Reservation)
        await ledger.settle(settlement(r, 0))
        if target in r.expired_ids:
            return
        assert time.monotonic() < deadline, f"hold {target} was never purged"
        await asyncio.sleep(0.01)


# -- lost replies ---------------------------------------------------------------------------------


class TestRetriedReserve:
    @pytest.fixture(params=[True, False], ids=["coalesced", "direct"])
    async def ledger(
        self, lossy: LossyRedis, request: pytest.FixtureRequest
    ) -> AsyncIterator[RedisLedger]:
        """Both reserve paths: coalesced into a pipeline (the default), and one EVALSHA each."""
        ledger = RedisLedger(client=lossy, coalesce=request.param)
        try:
            yield ledger
        finally:
            await ledger.aclose()

    async def test_is_not_double_held(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        holds = [HoldRequest(a, 100, 30), HoldRequest(b, 100, 30)]
        rid = new_reservation_id()
        lossy.arm(sha(ledger, "reserve"))
        result, failures = await retried(lambda: ledger.reserve(rid, holds, LONG_LEASE_MS))
        assert (failures, lossy.lost) == (1, 1)
        assert isinstance(result, Reservation)
        assert result.replayed is True  # the first attempt ran; the retry found its hold
        for x in (a, b):
            u = await ledger.usage(x, 100)
            assert (u.held, u.holds) == (30, 1)
        assert (await ledger.settle(settlement(result, 20))).outcome == "applied"
        for x in (a, b):
            u = await ledger.usage(x, 100)
            assert (u.held, u.spent) == (0, 20)

    async def test_retry_that_would_not_fit_again_is_still_admitted(
        self, ledger: RedisLedger, lossy: LossyRedis
    ) -> None:
        b = budget()
        holds = [HoldRequest(b, 10, 8)]  # a second hold of 8 would not fit
        rid = new_reservation_id()
        lossy.arm(sha(ledger, "reserve"))
        result, failures = await retried(lambda: ledger.reserve(rid, holds, LONG_LEASE_MS))
        assert failures == 1
        assert isinstance(result, Reservation)
        assert result.replayed is True
        assert (await ledger.usage(b, 10)).held == 8

    async def test_release_after_giving_up(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        """The caller gives up on a reserve whose reply was lost and releases its id."""
        b = budget()
        holds = [HoldRequest(b, 100, 30)]
        rid = new_reservation_id()
        lossy.arm(sha(ledger, "reserve"))
        with pytest.raises(LedgerUnavailable):
            await ledger.reserve(rid, holds, LONG_LEASE_MS)
        blind = (HeldBudget(b, 30, -1, "", 100, 0, None),)
        out = await ledger.settle(Settlement(rid, blind, 0, "cancelled"))
        assert out.outcome == "applied"
        u = await ledger.usage(b, 100)
        assert (u.held, u.holds, u.spent) == (0, 0, 0)


class TestRetriedSettle:
    async def test_is_not_double_charged(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        a, b = budget("user"), budget("team", "r:t1")
        r = await admit(ledger, HoldRequest(a, 100, 30), HoldRequest(b, 100, 30))
        lossy.arm(sha(ledger, "settle"))
        out, failures = await retried(lambda: ledger.settle(settlement(r, 25)))
        assert (failures, lossy.lost) == (1, 1)
        assert out.outcomes == ("duplicate", "duplicate")  # the lost attempt applied it
        for x in (a, b):
            u = await ledger.usage(x, 100)
            assert (u.spent, u.held) == (25, 0)

    async def test_lost_twice(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        b = budget()
        r = await admit(ledger, HoldRequest(b, 100, 30))
        lossy.arm(sha(ledger, "settle"), times=2)
        out, failures = await retried(lambda: ledger.settle(settlement(r, 25)))
        assert failures == 2
        assert out.outcome == "duplicate"
        assert (await ledger.usage(b, 100)).spent == 25

    async def test_batch_is_not_double_charged(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        b = budget()
        rs = [await admit(ledger, HoldRequest(b, 100, 10)) for _ in range(5)]
        batch = [settlement(r, i + 1) for i, r in enumerate(rs)]
        lossy.arm(sha(ledger, "settle"))
        out, failures = await retried(lambda: ledger.settle_many(batch))
        assert failures == 1
        assert [s.outcome for s in out] == ["duplicate"] * 5
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held) == (1 + 2 + 3 + 4 + 5, 0)

    async def test_settle_that_never_arrived_is_applied_by_the_retry(
        self, ledger: RedisLedger, lossy: LossyRedis
    ) -> None:
        b = budget()
        r = await admit(ledger, HoldRequest(b, 100, 30))
        lossy.arm(sha(ledger, "settle"), before=True)
        out, failures = await retried(lambda: ledger.settle(settlement(r, 25)))
        assert (failures, lossy.lost) == (1, 1)
        assert out.outcome == "applied"
        assert (await ledger.usage(b, 100)).spent == 25


class TestSettleRacingExpiry:
    """The hold expires and another reserve purges it between a settle's attempts."""

    async def test_late_settle_with_lost_reply(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        b = budget()
        r = await admit(ledger, HoldRequest(b, 100, 30), lease_ms=50)
        await purge_by_another_reserve(ledger, b, r.id)
        lossy.arm(sha(ledger, "settle"))
        out, failures = await retried(lambda: ledger.settle(settlement(r, 25)))
        assert failures == 1
        assert out.outcome == "duplicate"  # the lost attempt settled it late
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held, u.holds) == (25, 0, 0)

    async def test_applied_then_expiry_then_retry(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        b = budget()
        r = await admit(ledger, HoldRequest(b, 100, 30), lease_ms=300)
        lossy.arm(sha(ledger, "settle"))
        with pytest.raises(LedgerUnavailable):
            await ledger.settle(settlement(r, 25))
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held) == (25, 0)  # the first attempt ran
        # The lease passes and another reserve runs its purge before the retry arrives.
        deadline = time.monotonic() + 5
        while (await ledger.usage(b, 100)).now_ms <= r.now_ms + r.lease_ms:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        other = await admit(ledger, HoldRequest(b, 100, 1))
        assert r.id not in other.expired_ids
        out = await ledger.settle(settlement(r, 25))
        assert out.outcome == "duplicate"
        assert (await ledger.usage(b, 100)).spent == 25

    async def test_lost_request_then_expiry_then_retry(
        self, ledger: RedisLedger, lossy: LossyRedis
    ) -> None:
        b = budget()
        r = await admit(ledger, HoldRequest(b, 100, 30), lease_ms=50)
        lossy.arm(sha(ledger, "settle"), before=True)
        with pytest.raises(LedgerUnavailable):
            await ledger.settle(settlement(r, 25))
        await purge_by_another_reserve(ledger, b, r.id)
        out = await ledger.settle(settlement(r, 25))
        assert out.outcome == "late"
        again = await ledger.settle(settlement(r, 25))
        assert again.outcome == "duplicate"
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held) == (25, 0)


# -- outages and secrets --------------------------------------------------------------------------


class TestUnavailable:
    @pytest.fixture
    async def dead(self) -> AsyncIterator[RedisLedger]:
        ledger = RedisLedger(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2.0)
        try:
            yield ledger
        finally:
            await ledger.aclose()

    async def test_every_operation_raises_ledger_unavailable(self, dead: RedisLedger) -> None:
        b = budget()
        r = Reservation(new_reservation_id(), (HeldBudget(b, 1, 0, "e", 10, 9, None),), 1000, 0)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: dead.reserve(new_reservation_id(), [HoldRequest(b, 10, 1)], 1000),
            lambda: dead.settle(settlement(r, 1)),
            lambda: dead.settle_many([settlement(r, 1)]),
            lambda: dead.extend([r], 1000),
            lambda: dead.usage(b, 10),
            lambda: dead.set_limit(b, 5),
            lambda: dead.set_limit(b, None),
            lambda: dead.reset(b),
        ]
        for call in calls:
            with pytest.raises(LedgerUnavailable, match="redis unavailable"):
                await call()

    async def test_a_redis_that_stops_answering_times_out_then_serves_again(
        self, redis_url: str, redis_server: RedisServer
    ) -> None:
        """A batch gets one deadline (the socket timeout); the connection it broke is not reused."""
        ledger = RedisLedger(redis_url, socket_timeout=0.3)
        b = budget()
        try:
            await ledger.usage(b, 10)  # connected and checked before the pause
            with redis_server.client() as client:
                client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable, match="redis unavailable"):
                await ledger.reserve(new_reservation_id(), [HoldRequest(b, 10, 1)], LONG_LEASE_MS)
            assert time.monotonic() - started < 1.4  # the timeout, not the end of the pause
            with redis_server.client() as client:
                client.execute_command("CLIENT", "UNPAUSE")
            # The reserve that timed out may have run once the pause ended: it holds 1 at most.
            r = await admit(ledger, HoldRequest(b, 10, 2))
            assert r.holds[0].remaining in (7, 8)
        finally:
            with redis_server.client() as client:
                client.execute_command("CLIENT", "UNPAUSE")
            await ledger.aclose()

    @pytest.mark.parametrize("coalesce", [False, True], ids=["direct", "coalesced"])
    async def test_a_batch_cancelled_mid_flight_leaves_no_reply_for_the_next_caller(
        self, redis_url: str, redis_server: RedisServer, coalesce: bool
    ) -> None:
        """One pooled connection; the caller gives up while Redis is paused with its batch sent."""
        ledger = RedisLedger(redis_url, max_connections=1, coalesce=coalesce)
        b = budget()
        try:
            await ledger.usage(b, 10)
            with redis_server.client() as client:
                client.execute_command("CLIENT", "PAUSE", 5000, "ALL")
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        ledger.reserve(new_reservation_id(), [HoldRequest(b, 100, 7)], LONG_LEASE_MS),
                        0.2,
                    )
            finally:
                with redis_server.client() as client:
                    client.execute_command("CLIENT", "UNPAUSE")
            u = await ledger.usage(b, 10)  # its own reply, not the cancelled batch's
            assert u.limit == 10
            assert u.held in (0, 7)  # the cancelled script may or may not have run
            r = await admit(ledger, HoldRequest(b, 100, 1))
            assert r.holds[0].remaining in (99, 92)
        finally:
            await ledger.aclose()

    async def test_single_calls_do_not_wait_for_replicas(self, redis_url: str) -> None:
        """With BUDGET_WAIT_REPLICAS, batches wait; usage, set_limit, reset and a direct reserve do
        not (this server has no replica, so a WAIT would report 0 of 1)."""
        ledger = RedisLedger(redis_url, wait_replicas=1, wait_timeout_ms=50, coalesce=False)
        b = budget()
        try:
            await ledger.set_limit(b, 5)
            await ledger.reset(b)
            assert (await ledger.usage(b, 10)).limit == 5
            r = await admit(ledger, HoldRequest(b, 10, 1))
            with pytest.raises(LedgerUnavailable, match="0 of 1 replicas"):
                await ledger.settle_many([settlement(r, 1)])  # a batch: it waits
        finally:
            await ledger.aclose()

    async def test_more_than_a_hundred_concurrent_operations(self, redis_url: str) -> None:
        """A ledger built from a URL serves a burst of concurrent calls in one process.

        150 reservations (coalesced into one round trip), then 150 concurrent settles and 150
        concurrent usage reads: none may fail for want of a pooled connection.
        """
        ledger = RedisLedger(redis_url)
        try:
            b = budget()
            rs = await asyncio.gather(
                *(ledger.reserve(new_reservation_id(), [HoldRequest(b, 10**6, 1)], 60_000)
                  for _ in range(150))
            )  # fmt: skip
            assert all(isinstance(r, Reservation) for r in rs)
            results = await asyncio.gather(
                *(ledger.settle(settlement(r, 1)) for r in rs if isinstance(r, Reservation)),
                *(ledger.usage(b, 10**6) for _ in range(150)),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, f"{len(errors)} of 300 calls failed, first: {errors[0]!r}"
            u = await ledger.usage(b, 10**6)
            assert (u.spent, u.held) == (150, 0)
        finally:
            await ledger.aclose()


SECRET = "s3cr3t-Pa55word"


class TestSecretsStayOut:
    @pytest.mark.parametrize(
        ("url", "redacted"),
        [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (f"redis://:{SECRET}@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),
            (f"redis://admin:{SECRET}@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),
            (f"rediss://admin:{SECRET}@cache.example:6380", "rediss://***@cache.example:6380"),
            (f"redis://:p@ss:{SECRET}@10.0.0.1:6379", "redis://***@10.0.0.1:6379"),
            (f"unix://:{SECRET}@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1"),
        ],
    )
    def test_redact_url(self, url: str, redacted: str) -> None:
        assert redact_url(url) == redacted
        assert SECRET not in redact_url(url)

    @pytest.mark.parametrize(
        "url",
        [
            f"redis://127.0.0.1:6379/0?password={SECRET}",
            f"redis://127.0.0.1:6379/0?db=1&username=admin&password={SECRET}",
        ],
    )
    def test_redact_url_with_password_in_query(self, url: str) -> None:
        """redis-py accepts the password as a query parameter too; it must not be printed."""
        assert SECRET not in redact_url(url)
        assert SECRET not in repr(RedisLedger(url))

    async def test_repr_and_errors_hide_the_password(self, caplog: pytest.LogCaptureFixture) -> None:
        port = free_port()
        ledger = RedisLedger(f"redis://admin:{SECRET}@127.0.0.1:{port}/0", socket_timeout=2.0)
        try:
            assert SECRET not in repr(ledger)
            assert f"127.0.0.1:{port}" in repr(ledger)
            with caplog.at_level(logging.DEBUG), pytest.raises(LedgerUnavailable) as info:
                await ledger.usage(budget(), 10)
            assert SECRET not in str(info.value)
            assert SECRET not in repr(info.value)
            assert SECRET not in caplog.text
        finally:
            await ledger.aclose()

    async def test_wrong_password_is_unavailable_without_echoing_it(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with RedisServer(password="the-right-one") as server:
            wrong = RedisLedger(f"redis://:{SECRET}@127.0.0.1:{server.port}/0", socket_timeout=2.0)
            right = RedisLedger(server.url, socket_timeout=2.0)
            try:
                with caplog.at_level(logging.DEBUG), pytest.raises(LedgerUnavailable) as info:
                    await wrong.usage(budget(), 10)
                assert SECRET not in str(info.value)
                assert SECRET not in caplog.text
                assert "the-right-one" not in repr(right)
                assert (await right.usage(budget(), 10)).limit == 10
            finally:
                await wrong.aclose()
                await right.aclose()


# -- NOSCRIPT -------------------------------------------------------------------------------------


class TestNoScript:
    async def test_script_flush_between_every_call(
        self, ledger: RedisLedger, redis_server: RedisServer
    ) -> None:
        def flush() -> None:
            with redis_server.client() as client:
                client.script_flush()

        b = budget()
        flush()
        r = await admit(ledger, HoldRequest(b, 100, 30))
        flush()
        assert (await ledger.extend([r], LONG_LEASE_MS)).renewed == 1
        flush()
        assert (await ledger.usage(b, 100)).held == 30
        flush()
        assert (await ledger.settle(settlement(r, 20))).outcome == "applied"
        flush()
        assert (await ledger.usage(b, 100)).spent == 20
        flush()
        await ledger.reset(b)
        flush()
        assert (await ledger.usage(b, 100)).spent == 0

    async def test_script_flush_before_a_batch(
        self, ledger: RedisLedger, redis_server: RedisServer
    ) -> None:
        b = budget()
        rs = [await admit(ledger, HoldRequest(b, 100, 10)) for _ in range(4)]
        with redis_server.client() as client:
            client.script_flush()
        out = await ledger.settle_many([settlement(r, 5) for r in rs])
        assert [s.outcome for s in out] == ["applied"] * 4
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held) == (20, 0)
        with redis_server.client() as client:
            client.script_flush()
        assert (await ledger.extend(rs, LONG_LEASE_MS)).missing == 4

    async def test_script_flush_inside_a_batch(self, ledger: RedisLedger, lossy: LossyRedis) -> None:
        """The cache is flushed after the batch's first settle ran: the rest get NOSCRIPT.

        Every settle is applied exactly once, and each reports what it did.
        """
        b = budget()
        warm = await admit(ledger, HoldRequest(b, 100, 10))
        assert (await ledger.settle(settlement(warm, 0))).outcome == "applied"  # settle is loaded
        rs = [await admit(ledger, HoldRequest(b, 100, 10)) for _ in range(4)]
        lossy.flush_mid_batch = True
        out = await ledger.settle_many([settlement(r, 5) for r in rs])
        assert lossy.flush_mid_batch is False  # the flush did happen inside the batch
        u = await ledger.usage(b, 100)
        assert (u.spent, u.held) == (20, 0)
        assert [s.outcome for s in out] == ["applied"] * 4


# -- start-up check -------------------------------------------------------------------------------


class TestMaxmemoryPolicyCheck:
    @pytest.fixture
    def policy(self, redis_server: RedisServer) -> Iterator[Callable[[str], None]]:
        with redis_server.client() as client:
            original = client.config_get("maxmemory-policy")["maxmemory-policy"]

            def set_policy(value: str) -> None:
                client.config_set("maxmemory-policy", value)

            try:
                yield set_policy
            finally:
                set_policy(original)

    async def test_warns_when_keys_can_be_evicted(
        self, redis_url: str, policy: Callable[[str], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        policy("allkeys-lru")
        ledger = RedisLedger(redis_url)
        try:
            with caplog.at_level(logging.WARNING, logger="budget_middleware"):
                await ledger.usage(budget(), 10)
                await ledger.usage(budget(), 10)  # checked once per client, not per call
        finally:
            await ledger.aclose()
        warnings = [r for r in caplog.records if r.name == "budget_middleware"]
        assert len(warnings) == 1, caplog.text
        assert warnings[0].levelno == logging.WARNING
        assert "allkeys-lru" in warnings[0].getMessage()
        assert "noeviction" in warnings[0].getMessage()

    async def test_silent_with_noeviction(
        self, redis_url: str, policy: Callable[[str], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        policy("noeviction")
        ledger = RedisLedger(redis_url)
        try:
            with caplog.at_level(logging.WARNING, logger="budget_middleware"):
                await ledger.usage(budget(), 10)
        finally:
            await ledger.aclose()
        assert not [r for r in caplog.records if r.name == "budget_middleware"], caplog.text
