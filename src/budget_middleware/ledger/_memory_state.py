"""The memory ledger's state of one budget, and the bounded bookkeeping on it: purging expired holds
a batch at a time, rebuilding the expiry heap, dropping the spend of old windows."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

__all__ = [
    "HEAP_SLACK",
    "PURGE_BATCH",
    "BudgetState",
    "compact",
    "forget_older",
    "purge_expired",
    "tidy_windows",
]

# At most this many expired holds are purged by one operation (the rest on later ones).
PURGE_BATCH = 64
# A settled hold leaves its entry in the expiry heap (removing it there would cost a search); once
# dead entries outnumber live ones by this much, the heap is rebuilt from the live holds, so it
# stays bounded by the holds in flight instead of growing with every request of a lease.
HEAP_SLACK = 64


@dataclass(slots=True)
class BudgetState:
    """What Redis keeps in one budget's hash (see ARCHITECTURE.md, Redis layout)."""

    epoch: str
    held: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (expiry, amount)
    expiry_heap: list[tuple[int, str]] = field(default_factory=list)  # lazy: checked against holds
    expired: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (purged at, amount)
    done: dict[str, int] = field(default_factory=dict)  # recovered ids -> time
    spent: dict[int, int] = field(default_factory=dict)  # window -> micro-units
    touched_ms: int = 0
    period_ms: int = 0


def compact(st: BudgetState) -> None:
    """Rebuild the expiry heap from the live holds, dropping the entries of settled ones."""
    heap = [(expiry, rid) for rid, (expiry, _) in st.holds.items()]
    heapq.heapify(heap)
    st.expiry_heap = heap


def purge_expired(st: BudgetState, now: int, horizon_ms: int, expired_ids: list[str]) -> int:
    """Turn at most ``PURGE_BATCH`` expired holds into tombstones (their ids appended to
    ``expired_ids``); tombstones older than the horizon go. Returns how many were purged."""
    heap = st.expiry_heap
    purged = 0
    while heap and heap[0][0] <= now and purged < PURGE_BATCH:
        expiry, rid = heapq.heappop(heap)
        entry = st.holds.get(rid)
        if entry is None or entry[0] != expiry:
            continue  # settled, or renewed (a newer heap entry exists)
        del st.holds[rid]
        st.held -= entry[1]
        st.expired[rid] = (now, entry[1])
        expired_ids.append(rid)
        purged += 1
    if purged:
        forget_older(st.expired, now - horizon_ms)
    return purged


def forget_older(records: dict[str, tuple[int, int]] | dict[str, int], cutoff: int) -> None:
    """Drop the records made at or before ``cutoff``. They are kept in the order they were made
    (their time is the ledger's clock at insertion), so only the old ones at the front are looked
    at: the work is what is dropped, not what is kept."""
    old = []
    for rid, record in records.items():
        made = record[0] if isinstance(record, tuple) else record
        if made > cutoff:
            break
        old.append(rid)
    for rid in old:
        del records[rid]


def tidy_windows(st: BudgetState, period_ms: int, written: int, now: int) -> None:
    """Drop the spend of windows that ended two periods ago, once a new window was written."""
    if period_ms and len(st.spent) > 2:
        for w in [w for w in st.spent if w != written and w + 2 * period_ms < now]:
            del st.spent[w]
