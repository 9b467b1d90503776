"""``Finalizer``: the request path's side (``track``, ``submit``), the worker loop, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from ..identity import EntityHasher
from ..journal import Journal, ledger_identity
from ..ledger import Ledger, Reservation, Settled, Settlement
from ..ledger._types import SyncLedger
from ._counters import Counters
from ._recording import OnSettled, Recorder
from ._renewals import Renewals
from ._sending import Sender
from ._spool import Spool

__all__ = ["Finalizer"]

logger = logging.getLogger("budget_middleware")


class Finalizer(Counters):
    """One per middleware: owned by the lifespan's task group, or started lazily (asyncio or trio)."""

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
        on_settled: OnSettled | None = None,
        span_raw_ids: bool = False,
        journal: Journal | None = None,
        max_pending: int = 100_000,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        super().__init__()
        self.ledger = ledger
        self.lease_ms = lease_ms
        self.timeout_s = timeout_ms / 1000
        self.max_batch = max_batch
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.max_pending = max_pending
        # A ledger that settles synchronously (memory) is applied in submit: nothing can block it,
        # and it needs no journal: a settlement is applied before submit returns.
        self._settle_now = ledger.settle_now if isinstance(ledger, SyncLedger) else None
        self.journal = journal if self._settle_now is None else None
        if self.journal is not None and self.journal.identity is None:
            # Its files name this ledger: a deployment sharing the directory leaves them alone.
            self.journal.identity = ledger_identity(ledger)
        self._recorder = Recorder(
            self, hasher=hasher or EntityHasher(), span_raw_ids=span_raw_ids, on_settled=on_settled
        )
        self._spool = Spool(self, self.journal, max_pending, lease_ms, self._wake)
        self._renewals = Renewals(self._recorder)
        self._sender = Sender(self, ledger, self._spool, self._recorder, self.timeout_s, max_batch)
        self._wakeup: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        # When the idle worker wakes by itself (monotonic), -1 if busy. It sleeps at most a third
        # of a lease, so a request tracked meanwhile (due a third of its lease after it started)
        # need not wake it, unless its lease is shorter than the finalizer's.
        self._wait_until = -1.0
        self._stopping = False
        self._stopped = False
        self.running = False  # the worker runs (read on every request: an attribute)
        self._task: asyncio.Task[None] | None = None  # a worker started lazily on asyncio
        self._trio_launched = False  # ... or on trio, until it runs
        self._task_loop: object = None  # the event loop it was started on
        self._drained_loop: object = None
        self._scope: anyio.CancelScope | None = None

    @property
    def on_settled(self) -> Callable[[Settlement, Settled], None] | None:
        return self._recorder.on_settled

    @on_settled.setter
    def on_settled(self, hook: Callable[[Settlement, Settled], None] | None) -> None:
        self._recorder.on_settled = hook

    # -- the request path's side: synchronous, never awaits ------------------------------------

    def track(self, reservation: Reservation) -> None:
        """Keep an admitted reservation's leases renewed while its request runs."""
        due = time.monotonic() + reservation.lease_ms / 3000
        self._renewals.track(reservation, due)
        if due < self._wait_until and self._wakeup is not None:
            self._wakeup.set()  # the idle worker sleeps past this renewal: let it look again

    def submit(self, settlement: Settlement) -> None:
        """Hand a settlement over. Synchronous: nothing here can be cancelled."""
        self._renewals.forget(settlement.reservation_id)
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
                self._recorder.settled(settlement, result, started)
                return
        self._spool.put(settlement)

    @property
    def pending(self) -> int:
        return len(self._spool) + (1 if self._spool.busy else 0)

    @property
    def in_flight(self) -> int:
        return len(self._renewals)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        self._notify()

    def _notify(self) -> None:
        """Wake everyone waiting in ``wait_idle`` to look at the state again."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start the worker on this event loop (asyncio or trio) if no lifespan started it: an
        asyncio task with a strong reference, or a trio system task."""
        if self.running and not self._stopping:
            return
        loop = _event_loop()
        if self._task_loop is loop and self._launching():
            return
        if self._stopped and self._drained_loop is loop:
            # Shut down by the lifespan on this loop: a late request must not start a worker that
            # nobody will drain. Its settlement goes to the journal or is counted lost (logged).
            return
        self._stopping = self._stopped = self._spool.closed = False
        self._task_loop = loop
        if isinstance(loop, asyncio.AbstractEventLoop):
            self._task = loop.create_task(self.run(), name="budget-finalizer")
        else:
            import trio  # anyio's other backend; imported only when it runs

            self._trio_launched = True
            trio.lowlevel.spawn_system_task(self.run, name="budget-finalizer")

    def _launching(self) -> bool:
        """A worker was started lazily and has not ended (it may not have begun yet)."""
        return self._trio_launched or (self._task is not None and not self._task.done())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The worker; returns after ``drain`` once everything pending is applied (or journaled).

        With a journal, it first takes over the journals of processes that ended."""
        self._wakeup = anyio.Event()
        self.running = True
        self._stopping = self._stopped = self._spool.closed = False
        self._trio_launched = False  # it runs now: ``running`` says it from here
        try:
            with anyio.CancelScope() as self._scope:
                if self.journal is not None:
                    await self._spool.claim()
                task_status.started()
                async with anyio.create_task_group() as tg:
                    if self.journal is not None:
                        tg.start_soon(self._spool.spill_task)
                    await self._supervise()
                    tg.cancel_scope.cancel()
        finally:
            self._scope = None
            self.running = False
            self._notify()

    def _worker_alive(self) -> bool:
        return self.running or self._launching()

    async def wait_idle(self, timeout_s: float, *, requests: bool = False) -> bool:
        """Wait until nothing is pending (and, with ``requests``, no admitted request is still
        running): True, or False when ``timeout_s`` passes first."""
        with anyio.move_on_after(timeout_s):
            while self._unsettled() or (requests and self._renewals):
                # Pending work needs a worker pass; running requests only need the notification
                # that comes when one of them hands its settlement over.
                if self._wakeup is not None and self._unsettled():
                    self._wakeup.set()
                await self._changes()
            return True
        return False

    async def _changes(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _unsettled(self) -> bool:
        return self._spool.unsettled(self._stopping)

    async def drain(self, timeout_s: float) -> int:
        """Shut down: wait, within ``timeout_s``, for running requests to hand over their
        settlements and for everything pending to be applied; then stop. Returns what was lost:
        with a journal, what is still unapplied stays in it for the next start instead.

        Safe to call again (a drain cut short by a cancellation is finished by the next call), and
        it never waits for a worker that is gone: what the worker can no longer apply, the drain
        applies itself, until the deadline."""
        if self._stopped:
            return self._spool.drop("shutdown drained")
        deadline = anyio.current_time() + timeout_s
        with anyio.move_on_after(timeout_s):
            # Requests hand their settlements over; a live worker applies them meanwhile.
            while self._renewals or (self._unsettled() and self._worker_alive()):
                if self._wakeup is not None and self._unsettled():
                    self._wakeup.set()
                await self._changes()
        # Stop the worker: it ends its pass, or is cancelled (its batch goes back to the queue).
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        await self._wait_worker_gone(min(0.5, max(0.0, deadline - anyio.current_time())))
        if self._scope is not None:
            self._scope.cancel()
        await self._wait_worker_gone(2.0)
        await self._apply_left(deadline)
        self._stopped = self._spool.closed = True
        self._drained_loop = _event_loop()
        if self._renewals:
            logger.error(
                "budget: shutdown drained with %d requests still running; their holds expire by "
                "lease and what they settle from now on is journaled or counted as lost",
                len(self._renewals),
            )
        left = self._spool.drop("shutdown drained")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return left

    def abandon(self, why: str = "shutdown cut short") -> int:
        """Stop at once, without an await (a shutdown cancelled before its drain could run): what
        is unapplied is journaled, or counted and logged as lost; so is anything handed over
        later. Returns what was lost."""
        self._stopping = self._stopped = self._spool.closed = True
        if self._scope is not None:
            self._scope.cancel()
        self._drained_loop = _event_loop()
        return self._spool.drop(why)

    async def _wait_worker_gone(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            while self.running:
                await self._changes()

    async def _apply_left(self, deadline: float) -> None:
        """The worker is gone: apply what is still queued from here, with backoff, until the
        deadline (what is left then is journaled or counted by ``drain``)."""
        failures = 0
        while self._spool:
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            ok = False
            with anyio.move_on_after(left):
                ok = await self._pass()
            if not ok:
                failures += 1
                await anyio.sleep(
                    min(self._backoff(failures), max(0.0, deadline - anyio.current_time()))
                )

    # -- the worker ------------------------------------------------------------------------------

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
                self._spool.batch_done()
                await anyio.sleep(self._backoff(crashes))
                self._wakeup = anyio.Event()

    def _backoff(self, failures: int) -> float:
        delay: float = min(self.retry_cap_s, self.retry_base_s * 2 ** min(failures, 16))
        return delay * (0.5 + random.random() / 2)

    def _idle(self) -> bool:
        return not self._spool and not self._stopping and not self._spool.backlog

    async def _work(self) -> None:
        spool = self._spool
        failures = 0
        while True:
            if spool.has_marks and self._idle():
                await spool.journal_step(stopping=False)  # the applied marks, while it is quiet
            if self._idle():
                self._notify()
                wait = self._renewals.seconds_to_next(self.lease_ms / 3000)
                self._wait_until = time.monotonic() + wait
                assert self._wakeup is not None
                with anyio.move_on_after(wait):
                    await self._wakeup.wait()
                self._wait_until = -1.0
                self._wakeup = anyio.Event()
            if self._stopping and not spool:
                return
            ok = await self._pass()
            await self._renewals.renew_due(self.ledger, self.lease_ms, self.timeout_s, self.retry_base_s)
            self._notify()
            if ok:
                failures = 0
                continue
            if self._stopping:
                return  # draining and the ledger still fails: drain applies, journals or counts
            failures += 1
            await self._back_off(self._backoff(failures))

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
                await self._spool.journal_step(stopping=self._stopping)

    async def _pass(self) -> bool:
        """Journal what is new, then send one batch; False if the ledger failed."""
        if self.journal is not None:
            await self._spool.journal_step(stopping=self._stopping)
        return await self._sender.flush()


def _event_loop() -> object:
    """The running event loop: asyncio's, or trio's run (its root task stands for it)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    try:
        import trio

        return trio.lowlevel.current_root_task()
    except (ImportError, RuntimeError):
        return None  # no event loop runs (a synchronous caller)
