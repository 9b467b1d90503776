"""The background finalizer: applies settlements and lease renewals, in batches, with retries.

The request path never awaits a settlement: it calls ``submit`` (synchronous, so no cancellation
can interrupt it) and goes on. One worker task sends everything pending in one batch as soon as there
is work, so batches grow by themselves under load and a quiet server settles at once. Failed batches
are retried with capped backoff; settlements are idempotent, so a retry never double-charges.

With a ``Journal`` (``BUDGET_JOURNAL``), the worker appends every settlement to it before sending it
and marks it applied afterwards (one write and one fsync per batch, in a worker thread: the request
path does no file I/O), and at start replays what processes that ended left unapplied. The queue is
bounded by ``max_pending``: beyond it a settlement is handed to the journal (a second buffer that a
small task writes out at once) and applied when the queue has room again; without a journal it is
counted and logged as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Link, SpanContext, Status, StatusCode

from .amounts import format_micros
from .journal import Journal
from .keys import EntityHasher
from .ledger import (
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Reservation,
    Settled,
    Settlement,
)
from .ledger._types import SyncLedger
from .telemetry import (
    ATTR,
    EVENT_OVERRUN,
    SPAN_RENEW,
    SPAN_SETTLE,
    instruments,
    tracer,
)

__all__ = ["Finalizer"]

logger = logging.getLogger("budget_middleware")


class Finalizer:
    """One per middleware: owned by the lifespan's task group, or started lazily on asyncio."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        lease_ms: int = 60_000,
        timeout_ms: int = 2_000,
        max_batch: int = 256,
        retry_base_s: float = 0.05,
        retry_cap_s: float = 5.0,
        hasher: EntityHasher | None = None,
        on_settled: Callable[[Settlement, Settled], None] | None = None,
        span_raw_ids: bool = False,
        journal: Journal | None = None,
        max_pending: int = 100_000,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self.ledger = ledger
        self.lease_ms = lease_ms
        self.timeout_s = timeout_ms / 1000
        self.max_batch = max_batch
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self._hasher = hasher or EntityHasher()
        self.on_settled = on_settled
        self._span_raw_ids = span_raw_ids
        # A ledger that settles synchronously (memory) is applied in submit: nothing can block it,
        # and it needs no journal: a settlement is applied before submit returns.
        self._settle_now = ledger.settle_now if isinstance(ledger, SyncLedger) else None
        self.journal = journal if self._settle_now is None else None
        self.max_pending = max_pending
        self._pending: deque[Settlement] = deque()
        # Releases (zero settlements of reserves whose reply never came) wait apart: under the same
        # bound, but one is dropped before any real settlement is (its hold expires by lease).
        self._releases: deque[Settlement] = deque()
        self._release_drop_logged = -1e9
        self._inflight: dict[str, tuple[Reservation, float]] = {}
        self._wakeup: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._busy = False
        self._batch = 0  # the size of the batch in flight, counted in the bound
        # Releases in that batch, and how many of them give way to real settlements handed over
        # while the queue was full: dropped if the batch comes back, applied anyway if it succeeds.
        self._batch_releases = 0
        self._release_debt = 0
        # When the idle worker wakes by itself (monotonic), -1 if busy. It sleeps at most a third
        # of a lease, so a request tracked meanwhile (due a third of its lease after it started)
        # need not wake it, unless its lease is shorter than the finalizer's.
        self._wait_until = -1.0
        self._renew_failures = 0
        self._stopping = False
        self._stopped = False
        self._drained_loop: asyncio.AbstractEventLoop | None = None
        self.running = False  # the worker runs (read on every request: an attribute)
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._scope: anyio.CancelScope | None = None
        # Journal state. Each settlement knows whether it is journaled (``Settlement.journaled``);
        # ``_unwritten`` lists the ones handed over since the last journal write, in order.
        self._unwritten: list[Settlement] = []
        self._marks: list[str] = []  # ids applied, to mark in the journal with the next write
        self._spill: list[Settlement] = []  # over the bound: for the spill task to journal
        self._spilling = 0
        self._spill_wakeup: anyio.Event | None = None
        self._spill_logged = -1e9
        self._backlog = False  # the own journal file may hold settlements not in memory
        self._journal_failed = False
        self._journal_retry_at = 0.0
        # Counters for operators and tests.
        self.applied = 0
        self.retries = 0
        self.lost = 0
        self.journaled = 0  # deferred to the journal: over the bound, or unapplied at shutdown
        self.replayed = 0  # loaded back from the journal (processes that ended, or spilled)
        self.releases_dropped = 0  # releases given up (queue full, shutdown): no spend in them
        self.outcomes: dict[str, int] = {}

    # -- the request path's side: synchronous, never awaits ------------------------------------

    def track(self, reservation: Reservation) -> None:
        """Keep an admitted reservation's leases renewed while its request runs."""
        due = time.monotonic() + reservation.lease_ms / 3000
        self._inflight[reservation.id] = (reservation, due)
        if due < self._wait_until and self._wakeup is not None:
            self._wakeup.set()  # the idle worker sleeps past this renewal: let it look again

    def submit(self, settlement: Settlement) -> None:
        """Hand a settlement over. Synchronous: nothing here can be cancelled."""
        self._inflight.pop(settlement.reservation_id, None)
        if settlement.never_sent:
            return  # a release of a reserve that never reached the store: nothing to undo
        if self._changed is not None:  # someone waits, maybe for the running requests to end
            self._notify()
        if self._settle_now is not None:
            started = time.time_ns()
            try:
                result = self._settle_now(settlement)
            except Exception:
                logger.exception("budget: settling %s failed; queued", settlement.reservation_id)
            else:
                self._record(settlement, result, started)
                return
        self._queue(settlement)

    def _queue(self, settlement: Settlement) -> None:
        """Queue a settlement for the worker (or the journal, over the bound)."""
        release = _is_release(settlement)
        if len(self._pending) + len(self._releases) + self._batch >= self.max_pending:
            if release:
                self._drop_releases(1, "the settlement queue is full")
                return
            if self._releases:
                self._releases.popleft()  # the oldest release makes room for spend
                instruments().queue.add(-1)
                self._drop_releases(1, "the settlement queue is full")
            elif self._batch_releases > self._release_debt:
                self._release_debt += 1  # a release of the batch in flight makes room
            else:
                self._overflow(settlement)
                return
        if release:
            self._releases.append(settlement)
            instruments().queue.add(1)
            if self._stopped:
                self._drop_pending("a release arrived after shutdown")
            elif self._wakeup is not None:
                self._wakeup.set()
            self._notify()
            return
        self._pending.append(settlement)
        if self.journal is not None:
            self._unwritten.append(settlement)
        instruments().queue.add(1)
        if self._stopped:
            self._drop_pending("a settlement arrived after shutdown")
        elif self._wakeup is not None:
            self._wakeup.set()
        self._notify()

    def _drop_releases(self, n: int, why: str) -> None:
        """Count releases given up, and say so at most every ten seconds (never once per release):
        their holds expire by lease, no spend is lost."""
        self.releases_dropped += n
        now = time.monotonic()
        if now - self._release_drop_logged > 10:
            self._release_drop_logged = now
            logger.warning(
                "budget: releases dropped (%s): %d so far; their holds expire by lease (%d ms)",
                why,
                self.releases_dropped,
                self.lease_ms,
            )

    def _overflow(self, settlement: Settlement) -> None:
        """The queue is full: hand the settlement to the spill task, which journals it (memory stays
        bounded by twice ``max_pending`` even if the disk stalls); without a journal, it is lost."""
        if self.journal is not None and len(self._spill) < self.max_pending and not self._stopped:
            self._spill.append(settlement)
            if self._spill_wakeup is not None:
                self._spill_wakeup.set()
            return
        self.lost += 1
        instruments().lost.add(1)
        logger.error(
            "budget: settlement %s (actual %s, reason %s) lost: %d settlements are pending, the "
            "bound (BUDGET_MAX_PENDING) is %d%s",
            settlement.reservation_id,
            format_micros(settlement.actual),
            settlement.reason,
            len(self._pending) + self._batch,
            self.max_pending,
            "" if self.journal is None else " and the journal is not keeping up",
        )

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._releases) + (1 if self._busy else 0)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- lifecycle ------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start the worker on this asyncio loop if no lifespan started it (strong reference)."""
        if self.running and not self._stopping:
            return
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task_loop is loop:
            return
        if self._stopped and self._drained_loop is loop:
            # Shut down by the lifespan on this loop: a late request must not start a worker that
            # nobody will drain. Its settlement goes to the journal or is counted lost (logged).
            return
        self._stopping = False
        self._stopped = False
        self._task_loop = loop
        self._task = loop.create_task(self.run(), name="budget-finalizer")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The worker; returns after ``drain`` once everything pending is applied (or journaled).

        With a journal, it first takes over the journals of processes that ended."""
        self._wakeup = anyio.Event()
        self.running = True
        self._stopping = False
        self._stopped = False
        try:
            with anyio.CancelScope() as self._scope:
                if self.journal is not None:
                    await self._claim()
                task_status.started()
                async with anyio.create_task_group() as tg:
                    if self.journal is not None:
                        tg.start_soon(self._spill_task)
                    await self._supervise()
                    tg.cancel_scope.cancel()
        finally:
            self._scope = None
            self.running = False
            self._notify()

    async def _supervise(self) -> None:
        """Runs the worker. An error nobody expected (a bug, a failing telemetry exporter) is
        logged and the worker starts again after a backoff: settlements keep being applied, and
        the app's lifespan, which owns this task, does not fail with it."""
        crashes = 0
        while True:
            try:
                await self._work()
                return
            except Exception:
                crashes += 1
                logger.exception("budget: the finalizer's worker failed unexpectedly; restarting it")
                self._busy = False
                self._batch = 0
                delay = min(self.retry_cap_s, self.retry_base_s * 2 ** min(crashes, 16))
                await anyio.sleep(delay * (0.5 + random.random() / 2))
                self._wakeup = anyio.Event()

    async def _work(self) -> None:
        failures = 0
        while True:
            if self._marks and self._idle():
                await self._journal_step()  # make the applied marks durable while it is quiet
            if self._idle():
                self._notify()
                wait = self._seconds_to_next_renewal()
                self._wait_until = time.monotonic() + wait
                assert self._wakeup is not None
                with anyio.move_on_after(wait):
                    await self._wakeup.wait()
                self._wait_until = -1.0
                self._wakeup = anyio.Event()
            if self._stopping and not self._pending and not self._releases:
                return
            if self.journal is not None:
                await self._journal_step()
            ok = await self._flush()
            await self._renew_due()
            self._notify()
            if ok:
                failures = 0
                continue
            if self._stopping:
                return  # draining and the ledger still fails: drain journals or counts the rest
            failures += 1
            delay = min(self.retry_cap_s, self.retry_base_s * 2 ** min(failures, 16))
            await self._back_off(delay * (0.5 + random.random() / 2))

    async def _back_off(self, seconds: float) -> None:
        """Wait before retrying a failed batch; settlements handed over meanwhile are journaled
        at once, so a process killed during an outage loses none that reached the worker."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            assert self._wakeup is not None
            with anyio.move_on_after(left):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            if self.journal is not None:
                await self._journal_step()

    def _idle(self) -> bool:
        return not self._pending and not self._releases and not self._stopping and not self._backlog

    def _notify(self) -> None:
        """Wake everyone waiting in ``wait_idle`` to look at the state again."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _worker_alive(self) -> bool:
        return self.running or (self._task is not None and not self._task.done())

    async def wait_idle(self, timeout_s: float, *, requests: bool = False) -> bool:
        """Wait until nothing is pending (and, with ``requests``, no admitted request is still
        running): True, or False when ``timeout_s`` passes first."""
        with anyio.move_on_after(timeout_s):
            while self._unsettled() or (requests and self._inflight):
                # Pending work needs a worker pass; running requests only need the notification
                # that comes when one of them hands its settlement over.
                if self._wakeup is not None and self._unsettled():
                    self._wakeup.set()
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
            return True
        return False

    def _unsettled(self) -> bool:
        backlog = self._backlog and not self._stopping  # a stopping worker loads no more of it
        return bool(
            self._pending or self._releases or self._busy or self._spill or self._spilling or backlog
        )

    async def drain(self, timeout_s: float) -> int:
        """Shut down: wait, within ``timeout_s``, for running requests to hand over their
        settlements and for everything pending to be applied; then stop. Returns what was lost:
        with a journal, what is still unapplied stays in it for the next start instead.

        Safe to call again (a drain cut short by a cancellation is finished by the next call), and
        it never waits for a worker that is gone: what the worker can no longer apply, the drain
        applies itself, until the deadline."""
        if self._stopped:
            return self._drop_pending("shutdown drained")
        deadline = anyio.current_time() + timeout_s
        await self._wait_handed_over(deadline)
        # Stop the worker: it ends its pass, or is cancelled (its batch goes back to the queue).
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        await self._wait_worker_gone(min(0.5, max(0.0, deadline - anyio.current_time())))
        if self._scope is not None:
            self._scope.cancel()
        await self._wait_worker_gone(2.0)
        await self._apply_left(deadline)
        self._stopped = True
        with contextlib.suppress(RuntimeError):
            self._drained_loop = asyncio.get_running_loop()
        if self._inflight:
            logger.error(
                "budget: shutdown drained with %d requests still running; their holds expire by "
                "lease and what they settle from now on is journaled or counted as lost",
                len(self._inflight),
            )
        left = self._drop_pending("shutdown drained")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return left

    def abandon(self, why: str = "shutdown cut short") -> int:
        """Stop at once, without an await (a shutdown cancelled before its drain could run): what
        is unapplied is journaled, or counted and logged as lost; so is anything handed over
        later. Returns what was lost."""
        self._stopping = self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        with contextlib.suppress(RuntimeError):
            self._drained_loop = asyncio.get_running_loop()
        return self._drop_pending(why)

    async def _wait_handed_over(self, deadline: float) -> None:
        """Until ``deadline``: wait for running requests to hand their settlements over, and for
        a live worker to apply what is pending (not for a worker that is gone)."""
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            while self._inflight or (self._unsettled() and self._worker_alive()):
                if self._wakeup is not None and self._unsettled():
                    self._wakeup.set()
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    async def _wait_worker_gone(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            while self.running:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    async def _apply_left(self, deadline: float) -> None:
        """The worker is gone: apply what is still queued from here, with backoff, until the
        deadline (what is left then is journaled or counted by the caller)."""
        failures = 0
        while self._pending or self._releases:
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            ok = False
            with anyio.move_on_after(left):
                if self.journal is not None:
                    await self._journal_step()
                ok = await self._flush()
            if not ok:
                failures += 1
                delay = min(self.retry_cap_s, self.retry_base_s * 2 ** min(failures, 16))
                await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))

    def _drop_pending(self, why: str) -> int:
        """After shutdown: journal what is unapplied (synchronously: the worker is gone), or count
        it as lost. Closing the journal unlocks its file for the next start to replay. Releases
        are dropped: no spend is in them, and their holds expire by lease."""
        if self._releases:
            instruments().queue.add(-len(self._releases))
            self._drop_releases(len(self._releases), why)
            self._releases.clear()
        if self.journal is not None and self._shelve(why):
            return 0
        return self._count_lost(why)

    def _count_lost(self, why: str) -> int:
        self._unwritten = []
        spill, self._spill = self._spill, []
        left = len(self._pending) + len(spill)
        if spill:
            self._pending.extend(spill)
            instruments().queue.add(len(spill))
        if left:
            self.lost += left
            instruments().lost.add(left)
            instruments().queue.add(-left)
            total = sum(s.actual for s in self._pending)
            logger.error(
                "budget: %s with %d settlements unapplied (%s in actual cost); their holds expire "
                "by lease, their spend is not recorded",
                why,
                left,
                format_micros(total),
            )
            self._pending.clear()
        return left

    def _shelve(self, why: str) -> bool:
        journal = self.journal
        assert journal is not None
        pending = list(self._pending)
        fresh = [s for s in pending if not s.journaled]
        spill, marks = self._spill, self._marks
        left = len(pending) + len(spill)
        try:
            journal.write([*fresh, *spill], marks)
        except OSError as exc:
            logger.error("budget: the journal cannot be written (%s)", exc)
            journal.close()
            return False
        self._spill, self._marks, self._unwritten = [], [], []
        self._pending.clear()
        instruments().queue.add(-len(pending))
        journal.close()
        if left or self._backlog:
            self.journaled += left
            logger.warning(
                "budget: %s with %d settlements unapplied (%s in actual cost)%s; they stay in the "
                "journal in %s and are applied at the next start",
                why,
                left,
                format_micros(sum(s.actual for s in (*pending, *spill))),
                " and more spilled earlier" if self._backlog else "",
                journal.directory,
            )
        self._backlog = False
        return True

    # -- the journal, on the worker's side --------------------------------------------------------

    async def _claim(self) -> None:
        """Take over the journals of processes that ended; the loop loads them (bounded)."""
        assert self.journal is not None
        try:
            claimed = await anyio.to_thread.run_sync(self.journal.claim)
        except OSError:
            logger.exception("budget: the journal in %s cannot be replayed", self.journal.directory)
            return
        if claimed:
            logger.warning(
                "budget: replaying %d settlements left unapplied by processes that ended", claimed
            )
            self._backlog = True

    async def _journal_step(self) -> None:
        """Before a batch is sent: load spilled or replayed settlements when no journaled one is in
        memory (so none is loaded twice) and the queue has room; then journal the new settlements
        and the applied marks, in one write and one fsync, shielded so bookkeeping stays exact."""
        journal = self.journal
        assert journal is not None
        if self._journal_failed and time.monotonic() < self._journal_retry_at:
            return  # a failing disk is tried again once a second, not on every pass
        marks, self._marks = self._marks, []
        fresh, self._unwritten = self._unwritten, []
        loadable = (
            self._backlog
            and not self._stopping
            and not self._busy
            and len(self._pending) < self.max_pending
        )
        if not (loadable or fresh or marks):
            return
        with anyio.CancelScope(shield=True):
            try:
                if fresh or marks:
                    await anyio.to_thread.run_sync(journal.write, fresh, marks)
                    for s in fresh:
                        s.journaled = True
                    fresh, marks = [], []  # written: nothing to put back if the load fails
                if loadable:
                    self._backlog = False
                    room = self.max_pending - len(self._pending)
                    # What is in memory is in the file too (unapplied): load only the others.
                    queued = {s.reservation_id for s in self._pending}
                    loaded, more = await anyio.to_thread.run_sync(journal.unapplied, room + len(queued))
                    self._load([s for s in loaded if s.reservation_id not in queued], more)
            except OSError as exc:
                self._backlog = False  # what is in the file is replayed at the next start
                self._marks[:0] = marks
                # Meanwhile batches go out unjournaled (see _take_batch); the next write tries
                # again with those still pending, wherever they are in the queue.
                self._unwritten = [s for s in self._pending if not s.journaled]
                if not self._journal_failed:
                    logger.error("budget: the journal cannot be written or read (%s)", exc)
                self._journal_failed = True
                self._journal_retry_at = time.monotonic() + 1.0
                return
        if self._journal_failed:
            logger.warning("budget: the journal works again")
            self._journal_failed = False

    def _load(self, loaded: list[Settlement], more: bool) -> None:
        room = max(0, self.max_pending - len(self._pending))  # requests kept submitting meanwhile
        if len(loaded) > room:
            loaded, more = loaded[:room], True
        self._backlog = self._backlog or more
        if loaded:
            for s in loaded:
                s.journaled = True  # read back from the journal
            self._pending.extendleft(reversed(loaded))
            self.replayed += len(loaded)
            instruments().queue.add(len(loaded))
            over = min(len(self._releases), len(self._pending) + len(self._releases) - self.max_pending)
            if over > 0:  # spend first: releases make room
                for _ in range(over):
                    self._releases.popleft()
                instruments().queue.add(-over)
                self._drop_releases(over, "the settlement queue is full")

    async def _spill_task(self) -> None:
        """Journals what ``submit`` could not queue, as soon as it comes; the worker loads it back
        once the queue has room."""
        journal = self.journal
        assert journal is not None
        while True:
            if not self._spill:
                self._spill_wakeup = anyio.Event()
                await self._spill_wakeup.wait()
                continue
            batch, self._spill = self._spill, []
            self._spilling = len(batch)
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(journal.write, batch, ())
                except OSError as exc:
                    self.lost += len(batch)
                    instruments().lost.add(len(batch))
                    logger.error(
                        "budget: %d settlements over the pending bound lost (%s in actual cost): "
                        "the journal cannot be written (%s); ids %s",
                        len(batch),
                        format_micros(sum(s.actual for s in batch)),
                        exc,
                        ", ".join(s.reservation_id for s in batch),
                    )
                else:
                    self.journaled += len(batch)
                    self._backlog = True
                    now = time.monotonic()
                    if now - self._spill_logged > 10:
                        self._spill_logged = now
                        logger.warning(
                            "budget: the settlement queue is full (%d, BUDGET_MAX_PENDING); "
                            "settlements go to the journal and are applied when it has room "
                            "(%d so far)",
                            self.max_pending,
                            self.journaled,
                        )
                finally:
                    self._spilling = 0
            if self._wakeup is not None:
                self._wakeup.set()
            self._notify()

    # -- the worker's side ---------------------------------------------------------------------

    def _seconds_to_next_renewal(self) -> float:
        cap = self.lease_ms / 3000
        if not self._inflight:
            return cap
        soonest = min(due for _, due in self._inflight.values())
        return min(cap, max(0.0, soonest - time.monotonic()))

    async def _flush(self) -> bool:
        if not self._pending and not self._releases:
            return True
        batch = self._take_batch()
        if not batch:
            # Nothing journaled yet: the next pass journals, then sends. Those to journal are all
            # the pending ones not journaled (the list is exact again even if a cancelled write
            # lost track of some).
            self._unwritten = [s for s in self._pending if not s.journaled]
            return True
        self._busy = True
        self._batch = len(batch)
        started = time.time_ns()
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(self.timeout_s):
                results = await self.ledger.settle_many(batch)
        except (LedgerUnavailable, TimeoutError) as exc:  # an outage: retry the whole batch
            self._requeue(batch, exc)
            return False
        except anyio.get_cancelled_exc_class():
            self._requeue(batch, None)  # stopped mid-batch: count it with what is left
            raise
        except Exception as exc:  # not an outage (a script error, a bug): isolate the culprit
            logger.exception("budget: settle batch failed unexpectedly; retrying one by one")
            return await self._settle_each(batch, exc)
        finally:
            self._busy = False
            self._batch = 0
            self._batch_releases = 0
            self._release_debt = 0
        instruments().ledger_duration.record(time.perf_counter() - t0, {ATTR.OPERATION: "settle"})
        instruments().queue.add(-len(batch))
        for s, r in zip(batch, results, strict=True):
            self._record(s, r, started)
        return True

    def _take_batch(self) -> list[Settlement]:
        """Up to ``max_batch`` settlements from the left. With a journal that works, only the
        journaled ones: a settlement is in the journal before it is sent, so a batch that fails
        leaves nothing that a crash or a shutdown would lose."""
        pending = self._pending
        n = min(self.max_batch, len(pending))
        batch: list[Settlement]
        if self.journal is None or self._journal_failed:
            batch = [pending.popleft() for _ in range(n)]
        else:
            batch = []
            while pending and len(batch) < n and pending[0].journaled:
                batch.append(pending.popleft())
        real = len(batch)
        releases = self._releases
        while releases and len(batch) < self.max_batch:
            batch.append(releases.popleft())
        self._batch_releases = len(batch) - real
        return batch

    async def _settle_each(self, batch: list[Settlement], first: Exception) -> bool:
        ok = True
        for n, s in enumerate(batch):
            try:
                with anyio.fail_after(self.timeout_s):
                    (result,) = await self.ledger.settle_many([s])
            except anyio.get_cancelled_exc_class():
                self._requeue(batch[n:], None)
                raise
            except (LedgerUnavailable, TimeoutError) as exc:
                self._requeue([s], exc)
                ok = False
                continue
            except LedgerError as exc:
                # The store refused this one (out of memory, a script error): retry it a while
                # with the batch's backoff, then give up on it so it cannot block the queue.
                if s.attempts < _MAX_REFUSALS:
                    self._requeue([s], exc)
                    ok = False
                    continue
                logger.error(
                    "budget: settlement %s refused %d times (%s); counted as lost",
                    s.reservation_id,
                    s.attempts,
                    exc,
                )
                self.lost += 1
                instruments().lost.add(1)
                instruments().queue.add(-1)
                if self.journal is not None:
                    self._marks.append(s.reservation_id)
                continue
            except Exception:
                logger.exception(
                    "budget: settlement %s cannot be applied; counted as lost", s.reservation_id
                )
                self.lost += 1
                instruments().lost.add(1)
                instruments().queue.add(-1)
                if self.journal is not None:
                    self._marks.append(s.reservation_id)  # or every start would fail on it again
                continue
            instruments().queue.add(-1)
            self._record(s, result, time.time_ns())
        return ok

    def _requeue(self, batch: list[Settlement], exc: BaseException | None) -> None:
        if exc is not None:
            self.retries += 1
        for s in reversed(batch):
            if _is_release(s):
                if self._release_debt:  # it gave way to a real settlement queued meanwhile
                    self._release_debt -= 1
                    instruments().queue.add(-1)
                    self._drop_releases(1, "the settlement queue is full")
                    continue
                self._releases.appendleft(s)
            else:
                self._pending.appendleft(s)
            if exc is not None:
                s.attempts += 1
        if exc is None:
            return
        logger.warning(
            "budget: settle batch of %d failed (%s); will retry", len(batch), exc or "timeout"
        )

    def _record(self, s: Settlement, result: Settled, started_ns: int) -> None:
        outcome = result.outcome
        self.applied += 1
        if self.journal is not None:
            self._marks.append(s.reservation_id)
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        inst = instruments()
        inst.settlements.add(1, _settlement_attrs(s.reason, outcome))
        if s.actual:
            for hb, o in zip(s.holds, result.outcomes, strict=False):
                if o == "applied" or o == "late" or o == "recovered":
                    inst.spend.add(s.actual, _rule_attrs(hb.budget.rule))
        context = s.context
        if context is INVALID_SPAN_CONTEXT or (
            isinstance(context, SpanContext) and not context.is_valid
        ):
            # Its reserve span was not recorded: no tracing SDK was installed, so neither would
            # this one be. Skip the no-op span on the hot path.
            if self.on_settled is not None or outcome == "recovered" or outcome == "stale":
                self._after_record(s, result, outcome)
            return
        links = [Link(s.context)] if isinstance(s.context, SpanContext) else []
        span = tracer.start_span(SPAN_SETTLE, context=_ROOT, links=links, start_time=started_ns)
        if span.is_recording():  # build attributes only for a span somebody records
            attrs: dict[str, Any] = {
                ATTR.RESERVATION_ID: s.reservation_id,
                ATTR.REASON: s.reason,
                ATTR.ESTIMATE: s.estimate,
                ATTR.ACTUAL: s.actual,
                ATTR.RELEASED: max(0, s.estimate - s.actual),
                ATTR.OUTCOME: outcome,
                ATTR.LATE: outcome == "late",
                ATTR.RETRIES: s.attempts,
                ATTR.RULES: [hb.budget.rule for hb in s.holds],
                ATTR.ENTITIES: [
                    hb.budget.entity if self._span_raw_ids else self._hasher.for_span(hb.budget.entity)
                    for hb in s.holds
                ],
            }
            if s.trace_id:
                attrs[ATTR.TRACE_ID] = s.trace_id
            if s.actual > s.estimate:
                attrs[ATTR.OVERRUN] = s.actual - s.estimate
                span.add_event(EVENT_OVERRUN, {ATTR.OVERRUN: s.actual - s.estimate})
            span.set_attributes(attrs)
        span.end()
        self._after_record(s, result, outcome)

    def _after_record(self, s: Settlement, result: Settled, outcome: str) -> None:
        if outcome in ("recovered", "stale"):
            logger.warning(
                "budget: settlement %s was %s (reason %s, actual %s)",
                s.reservation_id,
                outcome,
                s.reason,
                format_micros(s.actual),
            )
        if self.on_settled is not None:
            try:
                self.on_settled(s, result)
            except Exception:
                logger.exception("budget: on_settled hook failed")

    async def _renew_due(self) -> None:
        if not self._inflight:
            return
        now = time.monotonic()
        due = [r for r, at in self._inflight.values() if at <= now]
        if not due:
            return
        t0 = time.perf_counter()
        with tracer.start_as_current_span(SPAN_RENEW, context=_ROOT) as span:
            span.set_attribute(ATTR.COUNT, len(due))
            try:
                with anyio.fail_after(self.timeout_s):
                    renewed = await self.ledger.extend(due, self.lease_ms)
            except (LedgerError, TimeoutError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc) or "timeout"))
                logger.warning("budget: lease renewal of %d failed (%s)", len(due), exc)
                # Try again after a capped backoff, well inside the lease, not in a busy loop.
                self._renew_failures += 1
                delay = min(self.lease_ms / 6000, self.retry_base_s * 2 ** min(self._renew_failures, 16))
                retry_at = time.monotonic() + delay * (0.5 + random.random() / 2)
                for r in due:
                    if r.id in self._inflight:
                        self._inflight[r.id] = (r, retry_at)
                return
            span.set_attribute(ATTR.RENEWED, renewed.renewed)
            span.set_attribute(ATTR.REHELD, renewed.reheld)
            span.set_attribute(ATTR.MISSING, renewed.missing)
        self._renew_failures = 0
        instruments().ledger_duration.record(time.perf_counter() - t0, {ATTR.OPERATION: "extend"})
        next_at = time.monotonic() + self.lease_ms / 3000
        for r in due:
            if r.id in self._inflight:
                self._inflight[r.id] = (r, next_at)


# Metric attributes, built once per value: the settlement counter's by reason and outcome (a
# handful of each), the spend counter's by rule.
_ATTRS_CACHE_SIZE = 1024
_settlement_attrs_cache: dict[tuple[str, str], dict[str, str]] = {}
_rule_attrs_cache: dict[str, dict[str, str]] = {}


def _settlement_attrs(reason: str, outcome: str) -> dict[str, str]:
    attrs = _settlement_attrs_cache.get((reason, outcome))
    if attrs is None:
        if len(_settlement_attrs_cache) >= _ATTRS_CACHE_SIZE:
            _settlement_attrs_cache.clear()
        attrs = _settlement_attrs_cache[reason, outcome] = {ATTR.REASON: reason, ATTR.OUTCOME: outcome}
    return attrs


def _rule_attrs(rule: str) -> dict[str, str]:
    attrs = _rule_attrs_cache.get(rule)
    if attrs is None:
        if len(_rule_attrs_cache) >= _ATTRS_CACHE_SIZE:
            _rule_attrs_cache.clear()
        attrs = _rule_attrs_cache[rule] = {ATTR.RULE: rule}
    return attrs


def _is_release(s: Settlement) -> bool:
    """A release: the zero settlement of a reserve whose reply never came (no spend in it)."""
    return s.actual == 0 and s.reason.startswith("release-")


# How often the store may refuse one settlement (not an outage) before it is given up as lost.
_MAX_REFUSALS = 20

# Settle and renew spans start their own traces: the request's span ended long ago. The link to the
# reserve span (and the request's trace id attribute) ties them back.
_ROOT = trace.set_span_in_context(trace.INVALID_SPAN)
