"""The spool: the settlements waiting for the ledger, and the journal that keeps them (see
ARCHITECTURE.md, section 7).

Each settlement knows whether it is journaled (``Settlement.journaled``). New ones are appended to the
queue and listed as unwritten; the worker journals the unwritten ones (one write, one fsync, in a
worker thread) and, while the journal works, sends only journaled ones: a batch that fails leaves
nothing a crash or a shutdown could lose. Applied ones are marked in the journal with the next write.

The queue is bounded by ``max_pending``. Releases (zero settlements of reserves whose reply never
came: no spend in them, and their holds expire by lease) wait apart under the same bound, and one is
dropped before any real settlement is. Beyond the bound a real settlement goes to the spill buffer,
which a task of its own journals at once, to be loaded back when the queue has room; without a
journal it is counted and logged as lost. After shutdown (``close``) what is handed over is journaled
synchronously, or counted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import anyio

from ..amounts import format_micros
from ..journal import Journal
from ..ledger import Settlement
from ..telemetry import instruments
from ._counters import Counters

__all__ = ["Spool", "is_release"]

logger = logging.getLogger("budget_middleware")

# How often a failing journal is tried again, and how often drops are logged (seconds).
_JOURNAL_RETRY_S = 1.0
_LOG_EVERY_S = 10.0


def is_release(s: Settlement) -> bool:
    """A release: the zero settlement of a reserve whose reply never came (no spend in it)."""
    return s.actual == 0 and s.reason.startswith("release-")


class Spool:
    def __init__(
        self,
        counts: Counters,
        journal: Journal | None,
        max_pending: int,
        lease_ms: int,
        wake: Callable[[], None],
    ) -> None:
        self._counts = counts
        self.journal = journal
        self.max_pending = max_pending
        self._lease_ms = lease_ms
        self._wake = wake  # tells the worker (and those who wait) that there is work
        self.pending: deque[Settlement] = deque()
        self.releases: deque[Settlement] = deque()
        self.closed = False  # shut down: what comes now is journaled at once, or counted
        # The batch in flight, counted in the bound; its releases, and how many of them give way to
        # real settlements queued while it was full (dropped if it comes back, applied if not).
        self.busy = False
        self._batch = 0
        self._batch_releases = 0
        self._release_debt = 0
        # The journal's side.
        self._unwritten: list[Settlement] = []  # handed over since the last write, in order
        self._marks: list[str] = []  # ids applied, to mark with the next write
        self._spill: list[Settlement] = []  # over the bound: for the spill task to journal
        self._spilling = 0
        # The spill batch being written in a worker thread: shutdown counts it too, or a process
        # that ends before the write finished would lose it without a word.
        self._spilling_batch: list[Settlement] = []
        self._spill_wakeup: anyio.Event | None = None
        self.backlog = False  # the own journal file may hold settlements not in memory
        self._journal_failed = False
        self._journal_retry_at = 0.0
        self._logged_spill = self._logged_release_drop = -1e9

    # -- handing over (the request path: synchronous) -------------------------------------------

    def __len__(self) -> int:
        return len(self.pending) + len(self.releases)

    def put(self, settlement: Settlement) -> None:
        release = is_release(settlement)
        if len(self.pending) + len(self.releases) + self._batch >= self.max_pending:
            if release:
                self._drop_releases(1, "the settlement queue is full")
                return
            if self.releases:
                self.releases.popleft()  # the oldest release makes room for spend
                instruments().queue.add(-1)
                self._drop_releases(1, "the settlement queue is full")
            elif self._batch_releases > self._release_debt:
                self._release_debt += 1  # a release of the batch in flight makes room
            else:
                self._overflow(settlement)
                return
        if release:
            self.releases.append(settlement)
        else:
            self.pending.append(settlement)
            if self.journal is not None:
                self._unwritten.append(settlement)
        instruments().queue.add(1)
        if self.closed:
            self.drop("a settlement arrived after shutdown")
        self._wake()

    def _overflow(self, settlement: Settlement) -> None:
        """The queue is full: hand the settlement to the spill task, which journals it (memory stays
        bounded by twice ``max_pending`` even if the disk stalls); without a journal, it is lost."""
        if self.journal is not None and len(self._spill) < self.max_pending and not self.closed:
            self._spill.append(settlement)
            if self._spill_wakeup is not None:
                self._spill_wakeup.set()
            return
        self._counts.lost += 1
        instruments().lost.add(1)
        logger.error(
            "budget: settlement %s (actual %s, reason %s) lost: %d settlements are pending, the "
            "bound (BUDGET_MAX_PENDING) is %d%s",
            settlement.reservation_id,
            format_micros(settlement.actual),
            settlement.reason,
            len(self.pending) + self._batch,
            self.max_pending,
            "" if self.journal is None else " and the journal is not keeping up",
        )

    def _drop_releases(self, n: int, why: str) -> None:
        """Count releases given up, and say so at most every ten seconds (never once per release):
        their holds expire by lease, no spend is lost."""
        self._counts.releases_dropped += n
        now = time.monotonic()
        if now - self._logged_release_drop > _LOG_EVERY_S:
            self._logged_release_drop = now
            logger.warning(
                "budget: releases dropped (%s): %d so far; their holds expire by lease (%d ms)",
                why,
                self._counts.releases_dropped,
                self._lease_ms,
            )

    # -- batches (the worker's side) ------------------------------------------------------------

    def take_batch(self, max_batch: int) -> list[Settlement]:
        """Up to ``max_batch`` settlements to send, real ones first. With a journal that works,
        only journaled ones: a settlement is in the journal before it is sent."""
        pending = self.pending
        n = min(max_batch, len(pending))
        batch: list[Settlement]
        if self.journal is None or self._journal_failed:
            batch = [pending.popleft() for _ in range(n)]
        else:
            batch = []
            while pending and len(batch) < n and pending[0].journaled:
                batch.append(pending.popleft())
            if not batch and pending:
                # Nothing journaled yet: the next journal write takes every pending one that is
                # not (the list is exact again even if a cancelled write lost track of some).
                self._unwritten = [s for s in pending if not s.journaled]
        real = len(batch)
        releases = self.releases
        while releases and len(batch) < max_batch:
            batch.append(releases.popleft())
        self.busy = bool(batch)
        self._batch = len(batch)
        self._batch_releases = len(batch) - real
        return batch

    def batch_done(self) -> None:
        """The batch in flight came back (applied, or requeued)."""
        self.busy = False
        self._batch = self._batch_releases = self._release_debt = 0

    def requeue(self, batch: list[Settlement], *, failed: bool) -> None:
        """Put a batch back at the head of the queue, as it was (releases that gave way while it was
        in flight are dropped now); ``failed`` counts an attempt on each."""
        for s in reversed(batch):
            if is_release(s):
                if self._release_debt:
                    self._release_debt -= 1
                    instruments().queue.add(-1)
                    self._drop_releases(1, "the settlement queue is full")
                    continue
                self.releases.appendleft(s)
            else:
                self.pending.appendleft(s)
            if failed:
                s.attempts += 1

    def applied(self, s: Settlement) -> None:
        """``s`` is in the ledger now: mark it in the journal with the next write."""
        if self.journal is not None:
            self._marks.append(s.reservation_id)

    def unsettled(self, stopping: bool) -> bool:
        backlog = self.backlog and not stopping  # a stopping worker loads no more of it
        return bool(
            self.pending or self.releases or self.busy or self._spill or self._spilling or backlog
        )

    @property
    def has_marks(self) -> bool:
        return bool(self._marks)

    # -- the journal (the worker's side) --------------------------------------------------------

    async def claim(self) -> None:
        """Take over the journals of processes that ended; the worker loads them (bounded)."""
        journal = self.journal
        assert journal is not None
        try:
            claimed = await anyio.to_thread.run_sync(journal.claim)
        except OSError:
            logger.exception("budget: the journal in %s cannot be replayed", journal.directory)
            return
        if claimed:
            logger.warning(
                "budget: replaying %d settlements left unapplied by processes that ended", claimed
            )
            self.backlog = True

    async def journal_step(self, *, stopping: bool) -> None:
        """Before a batch is sent: journal the new settlements and the applied marks, in one write
        and one fsync; then, when the queue has room, load spilled or replayed settlements that
        are not in memory. Shielded, so the bookkeeping stays exact."""
        journal = self.journal
        assert journal is not None
        if self._journal_failed and time.monotonic() < self._journal_retry_at:
            return  # a failing disk is tried again once a second, not on every pass
        marks, self._marks = self._marks, []
        fresh, self._unwritten = self._unwritten, []
        loadable = (
            self.backlog and not stopping and not self.busy and len(self.pending) < self.max_pending
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
                    self.backlog = False
                    room = self.max_pending - len(self.pending)
                    # What is in memory is in the file too (unapplied): load only the others.
                    queued = {s.reservation_id for s in self.pending}
                    loaded, more = await anyio.to_thread.run_sync(journal.unapplied, room + len(queued))
                    self._load([s for s in loaded if s.reservation_id not in queued], more)
            except OSError as exc:
                self.backlog = False  # what is in the file is replayed at the next start
                self._marks[:0] = marks
                # Meanwhile batches go out unjournaled (see take_batch); the next write tries
                # again with those still pending, wherever they are in the queue.
                self._unwritten = [s for s in self.pending if not s.journaled]
                if not self._journal_failed:
                    logger.error("budget: the journal cannot be written or read (%s)", exc)
                self._journal_failed = True
                self._journal_retry_at = time.monotonic() + _JOURNAL_RETRY_S
                return
        if self._journal_failed:
            logger.warning("budget: the journal works again")
            self._journal_failed = False

    def _load(self, loaded: list[Settlement], more: bool) -> None:
        room = max(0, self.max_pending - len(self.pending))  # requests kept submitting meanwhile
        if len(loaded) > room:
            loaded, more = loaded[:room], True
        self.backlog = self.backlog or more
        if not loaded:
            return
        for s in loaded:
            s.journaled = True  # read back from the journal
        self.pending.extendleft(reversed(loaded))
        self._counts.replayed += len(loaded)
        instruments().queue.add(len(loaded))
        over = min(len(self.releases), len(self.pending) + len(self.releases) - self.max_pending)
        if over > 0:  # spend first: releases make room
            for _ in range(over):
                self.releases.popleft()
            instruments().queue.add(-over)
            self._drop_releases(over, "the settlement queue is full")

    async def spill_task(self) -> None:
        """Journals what ``put`` could not queue, as soon as it comes; the worker loads it back
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
            self._spilling_batch = batch
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(journal.write, batch, ())
                except OSError as exc:
                    self._counts.lost += len(batch)
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
                    self._counts.journaled += len(batch)
                    self.backlog = True
                    now = time.monotonic()
                    if now - self._logged_spill > _LOG_EVERY_S:
                        self._logged_spill = now
                        logger.warning(
                            "budget: the settlement queue is full (%d, BUDGET_MAX_PENDING); "
                            "settlements go to the journal and are applied when it has room "
                            "(%d so far)",
                            self.max_pending,
                            self._counts.journaled,
                        )
                finally:
                    self._spilling = 0
                    self._spilling_batch = []
            self._wake()

    # -- shutdown: synchronous, the worker is gone -----------------------------------------------

    def drop(self, why: str) -> int:
        """Journal what is unapplied, or count it as lost; returns what was lost. Closing the journal
        unlocks its file for the next start to replay. Releases are dropped: no spend is in them."""
        if self.releases:
            instruments().queue.add(-len(self.releases))
            self._drop_releases(len(self.releases), why)
            self.releases.clear()
        if self.journal is not None and self._shelve(self.journal, why):
            return 0
        return self._count_lost(why)

    def _count_lost(self, why: str) -> int:
        self._unwritten = []
        spill, self._spill = [*self._spilling_batch, *self._spill], []
        self._spilling_batch = []
        left = len(self.pending) + len(spill)
        if not left:
            return 0
        total = sum(s.actual for s in self.pending) + sum(s.actual for s in spill)
        self._counts.lost += left
        instruments().lost.add(left)
        instruments().queue.add(-len(self.pending))
        logger.error(
            "budget: %s with %d settlements unapplied (%s in actual cost); their holds expire "
            "by lease, their spend is not recorded",
            why,
            left,
            format_micros(total),
        )
        self.pending.clear()
        return left

    def _shelve(self, journal: Journal, why: str) -> bool:
        pending = list(self.pending)
        fresh = [s for s in pending if not s.journaled]
        # A spill batch whose write may not have finished is written again: a line twice is read
        # once (by its id), a line missing is spend lost.
        spill, marks = [*self._spilling_batch, *self._spill], self._marks
        left = len(pending) + len(spill)
        try:
            journal.write([*fresh, *spill], marks)
        except OSError as exc:
            logger.error("budget: the journal cannot be written (%s)", exc)
            journal.close()
            return False
        for s in fresh:
            s.journaled = True
        self._spill, self._marks, self._unwritten = [], [], []
        self.pending.clear()
        instruments().queue.add(-len(pending))
        journal.close()
        if left or self.backlog:
            self._counts.journaled += left
            logger.warning(
                "budget: %s with %d settlements unapplied (%s in actual cost)%s; they stay in the "
                "journal in %s and are applied at the next start",
                why,
                left,
                format_micros(sum(s.actual for s in (*pending, *spill))),
                " and more spilled earlier" if self.backlog else "",
                journal.directory,
            )
        self.backlog = False
        return True
