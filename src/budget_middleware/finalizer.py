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
from .budgets import Budget
from .identity import EntityHasher
from .journal import Journal
from .ledger import (
    HeldBudget,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Reservation,
    Settled,
    Settlement,
    SettleOutcome,
)
from .ledger._types import HoldFacts, fast_path
from .telemetry import (
    ATTR,
    EVENT_OVERRUN,
    SPAN_RENEW,
    SPAN_SETTLE,
    instruments,
    metrics_recorded,
    tracer,
)

__all__ = ["Finalizer", "Hold"]

logger = logging.getLogger("budget_middleware")

# One admitted hold of a one-rule request on a ledger with ``reserve_hold`` (memory), as the
# middleware's lean path keeps it instead of a ``Reservation``: (reservation id, budget, amount,
# lease_ms, the ledger's ``HoldFacts`` as they came), the fields of the ``Reservation`` and its one
# ``HeldBudget``, which are built from it only when something needs them.
Hold = tuple[str, Budget, int, int, HoldFacts]


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
        # A ledger that settles synchronously (memory) is applied in submit: nothing can block it.
        self._settle_now: Callable[[Settlement], Settled] | None = getattr(ledger, "settle_now", None)
        # ... and settles one hold without the objects (``settle_hold``), for ``settle_hold`` here.
        self._settle_hold: Callable[[str, Budget, int, str, int], SettleOutcome] | None = (
            getattr(ledger, "settle_hold", None)
            if self._settle_now is not None and fast_path(ledger, "settle_hold", "settle_now")
            else None
        )
        # ... and needs no journal: a settlement is applied before submit returns.
        self.journal = journal if self._settle_now is None else None
        self.max_pending = max_pending
        self._pending: deque[Settlement] = deque()
        self._inflight: dict[str, tuple[Reservation | Hold, float]] = {}
        self._wakeup: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._busy = False
        self._batch = 0  # the size of the batch in flight, counted in the bound
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
        # Journal state. The last ``_unjournaled`` pending settlements are not in the journal yet
        # (new ones are appended on the right; journaled ones, requeued or replayed, go left).
        self._unjournaled = 0
        self._marks: list[str] = []  # ids applied, to mark in the journal with the next write
        self._spill: list[Settlement] = []  # over the bound: for the spill task to journal
        self._spilling = 0
        self._spill_wakeup: anyio.Event | None = None
        self._spill_logged = -1e9
        self._backlog = False  # the own journal file may hold settlements not in memory
        self._journal_failed = False
        self._journal_gap = False  # a write failed: some pending ones may be missing from it
        # Counters for operators and tests.
        self.applied = 0
        self.retries = 0
        self.lost = 0
        self.journaled = 0  # deferred to the journal: over the bound, or unapplied at shutdown
        self.replayed = 0  # loaded back from the journal (processes that ended, or spilled)
        self.outcomes: dict[str, int] = {}

    # -- the request path's side: synchronous, never awaits ------------------------------------

    def track(self, reservation: Reservation) -> None:
        """Keep an admitted reservation's leases renewed while its request runs."""
        due = time.monotonic() + reservation.lease_ms / 3000
        self._inflight[reservation.id] = (reservation, due)
        if due < self._wait_until and self._wakeup is not None:
            self._wakeup.set()  # the idle worker sleeps past this renewal: let it look again

    def track_hold(self, hold: Hold) -> None:
        """``track`` of the ``Reservation`` of one ``Hold``, which is built only if it is renewed."""
        due = time.monotonic() + hold[3] / 3000
        self._inflight[hold[0]] = (hold, due)
        if due < self._wait_until and self._wakeup is not None:
            self._wakeup.set()

    @property
    def settles_holds(self) -> bool:
        """Whether ``settle_hold`` applies a settlement at once, through the ledger's own
        ``settle_hold`` (the memory ledger), without building its objects."""
        return self._settle_hold is not None

    def submit(self, settlement: Settlement) -> None:
        """Hand a settlement over. Synchronous: nothing here can be cancelled."""
        self._inflight.pop(settlement.reservation_id, None)
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

    def settle_hold(
        self, hold: Hold, actual: int, reason: str, context: object = None, trace_id: str = ""
    ) -> None:
        """``submit`` of the settlement of one ``Hold``: ``Settlement(id, (its HeldBudget,),
        actual, reason, amount, context=context, trace_id=trace_id)``, applied the same way and
        recorded the same way. Synchronous: nothing here can be cancelled.

        With a ledger that settles holds (``settles_holds``) the common case, an applied
        settlement that nothing else watches (no ``on_settled`` hook, no span context, no meter
        provider), is only counted: no ``Settlement`` or ``Settled`` is built for it.
        """
        rid = hold[0]
        self._inflight.pop(rid, None)
        if self._changed is not None:  # someone waits, maybe for the running requests to end
            self._notify()
        settle = self._settle_hold
        if settle is not None:
            try:
                facts = hold[4]
                outcome = settle(rid, hold[1], facts[0], facts[1], actual)
            except Exception:
                logger.exception("budget: settling %s failed; queued", rid)
            else:
                if (
                    outcome == "applied"
                    and self.on_settled is None
                    and (context is None or context is INVALID_SPAN_CONTEXT)
                    and not metrics_recorded()
                ):
                    self.applied += 1
                    outcomes = self.outcomes
                    outcomes["applied"] = outcomes.get("applied", 0) + 1
                    return
                settlement = _settlement_of(hold, actual, reason, context, trace_id)
                self._record(settlement, Settled(rid, (outcome,)), time.time_ns())
                return
            self._queue(_settlement_of(hold, actual, reason, context, trace_id))
            return
        self.submit(_settlement_of(hold, actual, reason, context, trace_id))

    def _queue(self, settlement: Settlement) -> None:
        """Queue a settlement for the worker (or the journal, over the bound)."""
        if len(self._pending) + self._batch >= self.max_pending:
            self._overflow(settlement)
            return
        self._pending.append(settlement)
        self._unjournaled += 1
        instruments().queue.add(1)
        if self._stopped:
            self._drop_pending("a settlement arrived after shutdown")
        elif self._wakeup is not None:
            self._wakeup.set()
        self._notify()

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
        return len(self._pending) + (1 if self._busy else 0)

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
            if self._stopping and not self._pending:
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
        return not self._pending and not self._stopping and not self._backlog

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
        return bool(self._pending or self._busy or self._spill or self._spilling or backlog)

    async def drain(self, timeout_s: float) -> int:
        """Shut down: wait, within ``timeout_s``, for running requests to hand over their
        settlements and for everything pending to be applied; then stop. Returns what was lost:
        with a journal, what is still unapplied stays in it for the next start instead."""
        if not self._worker_alive() and self._unsettled():
            self.ensure_running()  # a worker that never started: start it to apply what waits
        await self.wait_idle(timeout_s, requests=True)
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        with anyio.move_on_after(0.5):
            await self.wait_idle(0.5)
        # Stop the worker (a batch in flight goes back to the queue) so what is left is counted.
        if self._scope is not None:
            self._scope.cancel()
        with anyio.move_on_after(2):
            while self.running:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        self._stopped = True
        with contextlib.suppress(RuntimeError):
            self._drained_loop = asyncio.get_running_loop()
        if self._inflight:
            logger.error(
                "budget: shutdown drained with %d requests still running; their holds expire by "
                "lease and whatever they settle from now on is lost",
                len(self._inflight),
            )
        left = self._drop_pending("shutdown drained")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return left

    def _drop_pending(self, why: str) -> int:
        """After shutdown: journal what is unapplied (synchronously: the worker is gone), or count
        it as lost. Closing the journal unlocks its file for the next start to replay."""
        if self.journal is not None and self._shelve(why):
            return 0
        return self._count_lost(why)

    def _count_lost(self, why: str) -> int:
        self._unjournaled = 0
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
        fresh = pending if self._journal_gap else self._fresh()  # a duplicate is harmless
        spill, marks = self._spill, self._marks
        left = len(pending) + len(spill)
        try:
            journal.write([*fresh, *spill], marks)
        except OSError as exc:
            logger.error("budget: the journal cannot be written (%s)", exc)
            journal.close()
            return False
        self._spill, self._marks, self._unjournaled, self._journal_gap = [], [], 0, False
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

    def _fresh(self) -> list[Settlement]:
        """The pending settlements not journaled yet: the last ``_unjournaled`` (read from the right
        end of the deque, which is quick there)."""
        q = self._pending
        return [q[-i] for i in range(min(self._unjournaled, len(q)), 0, -1)]

    async def _journal_step(self) -> None:
        """Before a batch is sent: load spilled or replayed settlements when no journaled one is in
        memory (so none is loaded twice) and the queue has room; then journal the new settlements
        and the applied marks, in one write and one fsync, shielded so bookkeeping stays exact."""
        journal = self.journal
        assert journal is not None
        marks, self._marks = self._marks, []
        loadable = (
            self._backlog
            and not self._stopping
            and not self._busy
            and len(self._pending) == self._unjournaled
            and len(self._pending) < self.max_pending
        )
        fresh = self._fresh()
        if not (loadable or fresh or marks):
            return
        with anyio.CancelScope(shield=True):
            try:
                if fresh or marks:
                    await anyio.to_thread.run_sync(journal.write, fresh, marks)
                    self._unjournaled = max(0, self._unjournaled - len(fresh))
                if loadable:
                    self._backlog = False
                    room = self.max_pending - len(self._pending)
                    loaded, more = await anyio.to_thread.run_sync(journal.unapplied, room + len(fresh))
                    queued = {s.reservation_id for s in fresh}  # just written, and in memory
                    self._load([s for s in loaded if s.reservation_id not in queued], more)
            except OSError as exc:
                self._backlog = False  # what is in the file is replayed at the next start
                self._marks[:0] = marks
                self._journal_gap = True
                if not self._journal_failed:
                    logger.error("budget: the journal cannot be written or read (%s)", exc)
                self._journal_failed = True
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
            self._pending.extendleft(reversed(loaded))
            self.replayed += len(loaded)
            instruments().queue.add(len(loaded))

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
        if not self._pending:
            return True
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        self._unjournaled = min(self._unjournaled, len(self._pending))
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
        instruments().ledger_duration.record(time.perf_counter() - t0, {ATTR.OPERATION: "settle"})
        instruments().queue.add(-len(batch))
        for s, r in zip(batch, results, strict=True):
            self._record(s, r, started)
        return True

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
        if exc is None:
            self._pending.extendleft(reversed(batch))
            return
        self.retries += 1
        for s in reversed(batch):
            s.attempts += 1
            self._pending.appendleft(s)
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
        due = [_reservation_of(r) for r, at in self._inflight.values() if at <= now]
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


def _held_of(hold: Hold) -> HeldBudget:
    _, budget, amount, _, (window, epoch, limit, remaining, reset_ms, *_) = hold
    return HeldBudget(budget, amount, window, epoch, limit, remaining, reset_ms)


def _reservation_of(r: Reservation | Hold) -> Reservation:
    if isinstance(r, Reservation):
        return r
    return Reservation(r[0], (_held_of(r),), r[3], r[4][8])


def _settlement_of(hold: Hold, actual: int, reason: str, context: object, trace_id: str) -> Settlement:
    return Settlement(
        hold[0], (_held_of(hold),), actual, reason, hold[2], context=context, trace_id=trace_id
    )


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


# How often the store may refuse one settlement (not an outage) before it is given up as lost.
_MAX_REFUSALS = 20

# Settle and renew spans start their own traces: the request's span ended long ago. The link to the
# reserve span (and the request's trace id attribute) ties them back.
_ROOT = trace.set_span_in_context(trace.INVALID_SPAN)
