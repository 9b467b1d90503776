"""The reservations in flight and when each lease is due for renewal: a heap of due times.

``track`` and ``forget`` run on the request path, so both are O(1) or O(log n) and never scan. A heap
entry is ``(due, id)``; the entry that counts for an id is the one whose time is the id's current
due time, so forgetting a request that ended, or rescheduling one, leaves a stale entry behind that
is skipped when it reaches the top (lazy deletion). When stale entries outnumber live ones the heap
is rebuilt from the live ones, so its size follows the requests in flight, however many come and go.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Iterable

import anyio

from ..ledger import Ledger, LedgerError, Reservation
from ._recording import Recorder

__all__ = ["Renewals"]

# The heap is rebuilt when it holds more than twice the live entries, plus this slack.
_SLACK = 64


class Renewals:
    __slots__ = ("_due", "_failures", "_heap", "_recorder")

    def __init__(self, recorder: Recorder) -> None:
        self._due: dict[str, tuple[Reservation, float]] = {}  # id -> (reservation, due time)
        self._heap: list[tuple[float, str]] = []
        self._recorder = recorder
        self._failures = 0  # renewals failed in a row

    def __len__(self) -> int:
        return len(self._due)

    def track(self, reservation: Reservation, due: float) -> None:
        rid = reservation.id
        self._due[rid] = (reservation, due)
        heap = self._heap
        heapq.heappush(heap, (due, rid))
        if len(heap) > 2 * len(self._due) + _SLACK:
            self._rebuild()

    def forget(self, reservation_id: str) -> None:
        """The request ended: its entry in the heap goes stale."""
        self._due.pop(reservation_id, None)

    def next_due(self) -> float | None:
        """The earliest due time of a live reservation, None if none is in flight."""
        heap, due = self._heap, self._due
        while heap:
            at, rid = heap[0]
            live = due.get(rid)
            if live is not None and live[1] == at:
                return at
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[Reservation]:
        """The reservations due at ``now``, taken off the heap (they stay in flight: ``schedule``
        them again once renewed)."""
        heap, due = self._heap, self._due
        out: dict[str, Reservation] = {}  # an id tracked twice at the same instant comes once
        while heap and heap[0][0] <= now:
            at, rid = heapq.heappop(heap)
            live = due.get(rid)
            if live is not None and live[1] == at:
                out[rid] = live[0]
        return list(out.values())

    def schedule(self, reservations: Iterable[Reservation], at: float) -> None:
        """Due again at ``at``: those of ``reservations`` still in flight."""
        due, heap = self._due, self._heap
        for r in reservations:
            if r.id in due:
                due[r.id] = (r, at)
                heapq.heappush(heap, (at, r.id))

    def seconds_to_next(self, cap: float) -> float:
        """Seconds until the next renewal is due, at most ``cap``."""
        soonest = self.next_due()
        if soonest is None:
            return cap
        return min(cap, max(0.0, soonest - time.monotonic()))

    async def renew_due(
        self, ledger: Ledger, lease_ms: int, timeout_s: float, retry_base_s: float
    ) -> None:
        """Renew the leases that are due, in one call; due again a third of a lease later, or
        after a capped backoff (well inside the lease) if the renewal failed."""
        due = self.pop_due(time.monotonic())
        if not due:
            return
        recorder = self._recorder
        t0 = time.perf_counter()
        try:
            with recorder.renewal(len(due)) as span:
                try:
                    with anyio.fail_after(timeout_s):
                        renewed = await ledger.extend(due, lease_ms)
                except (LedgerError, TimeoutError) as exc:
                    recorder.renewal_failed(span, len(due), exc)
                    self._failures += 1
                    delay = min(lease_ms / 6000, retry_base_s * 2 ** min(self._failures, 16))
                    self.schedule(due, time.monotonic() + delay * (0.5 + random.random() / 2))
                    return
                recorder.renewed(span, renewed, t0)
        except BaseException:
            self.schedule(due, time.monotonic())  # still due: a restarted worker tries again
            raise
        self._failures = 0
        self.schedule(due, time.monotonic() + lease_ms / 3000)

    def heap_size(self) -> int:
        """Entries in the heap, live and stale (for tests: it stays bounded)."""
        return len(self._heap)

    def _rebuild(self) -> None:
        self._heap = [(at, rid) for rid, (_, at) in self._due.items()]
        heapq.heapify(self._heap)
