"""The finalizer through a Redis outage, on a real ``redis-server`` stopped and started again.

The server here is the test's own (not the session fixture's): it keeps its port across a restart and
its data too (``SHUTDOWN SAVE`` writes an RDB file that the next start loads), as a Redis with
persistence would, so the spend the settlements add can be checked exactly afterwards.

Checked: settlements wait, retry and are applied once Redis returns, exactly once (spent is the sum
of actual costs, held is 0); past ``max_pending`` they are counted as lost and logged without a
journal, or spilled to the journal and applied later with one; a process that stops (drain timing
out) or dies (SIGKILL) leaves them in its journal, and the next finalizer replays them once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from asgi_helpers import wait_until
from budget_middleware import format_micros
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.journal import Journal, encode_settlement, read_unapplied
from budget_middleware.ledger import (
    HoldRequest,
    RedisLedger,
    Reservation,
    Settlement,
    new_reservation_id,
)
from redis_server import free_port, require_redis_server

pytestmark = pytest.mark.redis

DEADLINE_S = 15.0
LIMIT = 1_000_000_000
USER = Budget("user", "r:alice", 86_400_000)
TEAM = Budget("team", "r:red", 0)


class RestartableRedis:
    """A ``redis-server`` on a fixed port whose data survives ``stop()``/``start()``."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_redis_server()
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        # No retries: redis-py's default backoff would retry the SHUTDOWN for seconds.
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def start(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--dir", str(self.workdir),
            "--dbfilename", "dump.rdb",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.ConnectionError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Save the data and exit (the port is closed afterwards: connections are refused)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(redis.RedisError), self.client() as c:
            c.shutdown(save=True)
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableRedis]:
    srv = RestartableRedis(tmp_path / "redis")
    srv.workdir.mkdir()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def ledger(server: RestartableRedis) -> AsyncIterator[RedisLedger]:
    led = RedisLedger(server.url, socket_timeout=1.0)
    try:
        yield led
    finally:
        with anyio.move_on_after(2, shield=True):
            await led.aclose()


async def reserve_many(ledger: RedisLedger, n: int) -> list[Settlement]:
    """``n`` reservations on two budgets, and their settlements with distinct actual costs."""
    out = []
    for i in range(n):
        holds = [HoldRequest(USER, LIMIT, 5_000_000), HoldRequest(TEAM, LIMIT, 5_000_000)]
        r = await ledger.reserve(new_reservation_id(), holds, 600_000)
        assert isinstance(r, Reservation)
        out.append(Settlement(r.id, r.holds, 1_000_000 + 1_001 * i, "ok", 5_000_000))
    return out


async def assert_spent_exactly(ledger: RedisLedger, settlements: list[Settlement]) -> None:
    total = sum(s.actual for s in settlements)
    for budget in (USER, TEAM):
        usage = await ledger.usage(budget, LIMIT)
        assert (usage.spent, usage.held, usage.holds) == (total, 0, 0), budget


def finalizer(ledger: RedisLedger, **options: Any) -> Finalizer:
    """A finalizer that retries quickly (the defaults back off up to 5 s)."""
    return Finalizer(ledger, retry_base_s=0.01, retry_cap_s=0.1, timeout_ms=1_000, **options)


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.jsonl"))


# =================================================================================================
# Without a journal
# =================================================================================================


async def test_settlements_wait_for_redis_and_are_applied_once_when_it_returns(
    server: RestartableRedis, ledger: RedisLedger
) -> None:
    settlements = await reserve_many(ledger, 20)
    server.stop()
    fin = finalizer(ledger)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        for s in settlements:
            fin.submit(s)
        await wait_until(lambda: fin.retries >= 3, what="retries while Redis is down")
        assert fin.applied == 0
        assert fin.pending == 20

        server.start()
        assert await fin.wait_idle(DEADLINE_S)
        assert fin.applied == 20
        assert fin.outcomes == {"applied": 20}
        assert fin.lost == 0
        await assert_spent_exactly(ledger, settlements)

        # Settling them all again (a retry whose reply was lost) changes nothing.
        for s in settlements:
            fin.submit(Settlement(s.reservation_id, s.holds, s.actual, s.reason, s.estimate))
        assert await fin.wait_idle(DEADLINE_S)
        assert fin.outcomes == {"applied": 20, "duplicate": 20}
        await assert_spent_exactly(ledger, settlements)
        assert await fin.drain(1) == 0


async def test_past_the_bound_without_a_journal_settlements_are_counted_lost_and_logged(
    server: RestartableRedis, ledger: RedisLedger, caplog: pytest.LogCaptureFixture
) -> None:
    settlements = await reserve_many(ledger, 5)
    server.stop()
    fin = finalizer(ledger, max_pending=3)
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        for s in settlements:
            fin.submit(s)
    assert fin.lost == 2
    assert fin.pending == 3
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for s in settlements[3:]:
        assert any(s.reservation_id in m and format_micros(s.actual) in m for m in messages), s
    assert not any(s.reservation_id in m for m in messages for s in settlements[:3])

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        assert await fin.drain(0.2) == 3  # Redis is still down: the rest is lost too, and said so
    assert fin.lost == 5
    assert any("3 settlements unapplied" in r.getMessage() for r in caplog.records)


# =================================================================================================
# With a journal
# =================================================================================================


async def test_past_the_bound_settlements_go_to_the_journal_and_are_applied_later(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path
) -> None:
    settlements = await reserve_many(ledger, 12)
    server.stop()
    journal = Journal(tmp_path / "journal")
    fin = finalizer(ledger, journal=journal, max_pending=4)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        for n, s in enumerate(settlements, 1):
            fin.submit(s)
            assert fin.pending <= 4
            # Requests end one by one; each overflow is journaled by the spill task (not by submit).
            spilled = max(0, n - 4)
            await wait_until(lambda: fin.journaled == spilled, what="the spill")  # noqa: B023 (awaited at once)
        assert fin.lost == 0
        await wait_until(lambda: fin.retries >= 2, what="retries")
        assert journal.path is not None
        assert {s.reservation_id for s in read_unapplied(journal.path)} == {
            s.reservation_id for s in settlements
        }
        assert fin.pending <= 4

        server.start()
        assert await fin.wait_idle(DEADLINE_S)
        assert fin.applied == 12
        assert fin.outcomes == {"applied": 12}
        assert (fin.lost, fin.replayed) == (0, 8)
        await assert_spent_exactly(ledger, settlements)
        assert read_unapplied(journal.path) == []
        assert await fin.drain(1) == 0
    assert journal_files(tmp_path / "journal") == []  # all applied: deleted at close


async def test_memory_stays_bounded_when_the_journal_cannot_keep_up(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a running worker nothing writes the spill buffer: it holds at most ``max_pending``
    more; past that, settlements are lost, counted and logged, even with a journal."""
    settlements = await reserve_many(ledger, 7)
    server.stop()
    fin = finalizer(ledger, journal=Journal(tmp_path), max_pending=3)
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        for s in settlements:
            fin.submit(s)
    assert (fin.pending, fin.lost) == (3, 1)
    assert settlements[-1].reservation_id in caplog.text
    assert await fin.drain(0.2) == 0  # the worker starts, fails, and journals the six at shutdown
    assert (fin.journaled, fin.lost) == (6, 1)
    (left,) = journal_files(tmp_path)
    assert len(read_unapplied(left)) == 6


async def test_a_stopped_process_leaves_its_settlements_to_the_next_start_which_applies_them_once(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settlements = await reserve_many(ledger, 10)
    directory = tmp_path / "journal"
    server.stop()

    first = finalizer(ledger, journal=Journal(directory))
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        for s in settlements[:6]:
            first.submit(s)
        await wait_until(lambda: first.retries >= 1, what="a failed batch")
        for s in settlements[6:]:  # not journaled by the worker yet: drain writes them
            first.submit(s)
        with caplog.at_level(logging.WARNING, logger="budget_middleware"):
            assert await first.drain(0.1) == 0
    assert (first.lost, first.journaled, first.applied) == (0, 10, 0)
    assert any("applied at the next start" in r.getMessage() for r in caplog.records)
    (left,) = journal_files(directory)
    assert sorted(s.reservation_id for s in read_unapplied(left)) == sorted(
        s.reservation_id for s in settlements
    )
    backup = tmp_path / "backup.jsonl"
    shutil.copy(left, backup)

    server.start()
    second = finalizer(ledger, journal=Journal(directory))
    async with anyio.create_task_group() as tg:
        await tg.start(second.run)
        await wait_until(lambda: second.applied == 10, what="the replay")
        assert await second.wait_idle(DEADLINE_S)
        assert await second.drain(1) == 0
    assert second.outcomes == {"applied": 10}
    assert second.replayed == 10
    await assert_spent_exactly(ledger, settlements)
    assert journal_files(directory) == []

    # The same journal replayed again (say the first replay died before deleting it): no change.
    shutil.copy(backup, directory / left.name)
    third = finalizer(ledger, journal=Journal(directory))
    async with anyio.create_task_group() as tg:
        await tg.start(third.run)
        await wait_until(lambda: third.applied == 10, what="the second replay")
        assert await third.drain(1) == 0
    assert third.outcomes == {"duplicate": 10}
    await assert_spent_exactly(ledger, settlements)
    assert journal_files(directory) == []


CHILD = textwrap.dedent(
    """
    import json, sys
    import anyio
    from budget_middleware.finalizer import Finalizer
    from budget_middleware.journal import Journal, decode_settlement
    from budget_middleware.ledger import RedisLedger

    async def main(url, directory):
        settlements = [decode_settlement(json.loads(line)) for line in sys.stdin]
        ledger = RedisLedger(url, socket_timeout=1.0)
        journal = Journal(directory)
        fin = Finalizer(ledger, journal=journal, retry_base_s=0.01, retry_cap_s=0.1, timeout_ms=1000)
        async with anyio.create_task_group() as tg:
            await tg.start(fin.run)
            for s in settlements:
                fin.submit(s)
            with anyio.fail_after(15):
                while fin.retries < 2 or len(journal.unapplied()[0]) < len(settlements):
                    await anyio.sleep(0.01)
            print("ready", flush=True)
            await anyio.sleep_forever()

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def test_a_killed_process_leaves_its_settlements_to_the_next_start(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path
) -> None:
    settlements = await reserve_many(ledger, 8)
    directory = tmp_path / "journal"
    server.stop()
    stdin = "".join(json.dumps(encode_settlement(s)) + "\n" for s in settlements)
    async with await anyio.open_process(
        [sys.executable, "-c", CHILD, server.url, str(directory)], stderr=None
    ) as proc:
        try:
            assert proc.stdin is not None
            assert proc.stdout is not None
            await proc.stdin.send(stdin.encode())
            await proc.stdin.aclose()
            output = b""
            with anyio.fail_after(DEADLINE_S):
                while not output.endswith(b"\n"):
                    output += await proc.stdout.receive()
            assert output == b"ready\n"

            # Alive: a finalizer starting now must not take its journal over.
            probe = Journal(directory)
            assert probe.claim() == 0
            probe.close()
            (child_file,) = journal_files(directory)
            assert len(read_unapplied(child_file)) == 8

            proc.send_signal(signal.SIGKILL)
            with anyio.fail_after(DEADLINE_S):
                assert await proc.wait() == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
                with anyio.move_on_after(DEADLINE_S, shield=True):
                    await proc.wait()

    server.start()
    fin = finalizer(ledger, journal=Journal(directory))
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        await wait_until(lambda: fin.applied == 8, what="the replay")
        assert await fin.wait_idle(DEADLINE_S)
        assert await fin.drain(1) == 0
    assert fin.outcomes == {"applied": 8}
    assert fin.lost == 0
    await assert_spent_exactly(ledger, settlements)
    assert journal_files(directory) == []


# =================================================================================================
# The journal in normal operation
# =================================================================================================


async def test_every_settlement_is_journaled_off_the_event_loop_and_marked_applied(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settlements = await reserve_many(ledger, 6)
    journal = Journal(tmp_path)
    loop_thread = threading.get_ident()
    writes: list[tuple[int, int, int]] = []
    real_write = journal.write

    def recording_write(batch: Sequence[Settlement] = (), applied: Iterable[str] = ()) -> None:
        applied = list(applied)
        writes.append((threading.get_ident(), len(batch), len(applied)))
        real_write(batch, applied)

    monkeypatch.setattr(journal, "write", recording_write)
    fin = finalizer(ledger, journal=journal)
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        for s in settlements:
            fin.submit(s)  # no file I/O here
        assert writes == []
        assert await fin.wait_idle(DEADLINE_S)
        await wait_until(lambda: sum(w[2] for w in writes) == 6, what="the applied marks")
        assert sum(w[1] for w in writes) == 6
        assert all(thread != loop_thread for thread, _, _ in writes)
        assert journal.path is not None
        ops = [json.loads(line)["op"] for line in journal.path.read_text().splitlines()]
        assert ops[0] == "ledger"  # the identity of the ledger the file belongs to
        assert sorted(ops[1:]) == ["applied"] * 6 + ["settle"] * 6
        assert await fin.drain(1) == 0
    assert fin.outcomes == {"applied": 6}
    await assert_spent_exactly(ledger, settlements)
    assert journal_files(tmp_path) == []


async def test_a_journal_that_fails_does_not_stop_settlements(
    server: RestartableRedis,
    ledger: RedisLedger,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settlements = await reserve_many(ledger, 4)
    journal = Journal(tmp_path)

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "write", disk_full)
    fin = finalizer(ledger, journal=journal)
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        async with anyio.create_task_group() as tg:
            await tg.start(fin.run)
            for s in settlements:
                fin.submit(s)
            assert await fin.wait_idle(DEADLINE_S)
            assert await fin.drain(1) == 0
    assert fin.outcomes == {"applied": 4}
    await assert_spent_exactly(ledger, settlements)
    assert "the journal cannot be written" in caplog.text


async def test_replayed_settlements_and_new_ones_are_each_applied_once(
    server: RestartableRedis, ledger: RedisLedger, tmp_path: Path
) -> None:
    """At start the queue holds new settlements (not journaled yet) and the journal of a process
    that ended holds others: the new ones are journaled and the old ones loaded, none twice."""
    settlements = await reserve_many(ledger, 5)
    dead = Journal(tmp_path)
    dead.write(settlements[:3])
    dead.close()
    fin = finalizer(ledger, journal=Journal(tmp_path))
    for s in settlements[3:]:
        fin.submit(s)  # before the worker runs
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        await wait_until(lambda: fin.applied >= 5, what="all five")
        assert await fin.wait_idle(DEADLINE_S)
        assert await fin.drain(1) == 0
    assert fin.outcomes == {"applied": 5}
    assert fin.replayed == 3
    await assert_spent_exactly(ledger, settlements)
    assert journal_files(tmp_path) == []
