"""What the finalizer counts, for operators and tests; its parts add to the same counters."""

from __future__ import annotations

__all__ = ["Counters"]


class Counters:
    """The finalizer's counters. ``Finalizer`` is one; the spool and the recorder are handed it."""

    def __init__(self) -> None:
        self.applied = 0  # settlements the ledger answered (any outcome)
        self.retries = 0  # failed batches retried
        self.lost = 0  # settlements whose spend could not be applied nor journaled (logged)
        self.journaled = 0  # deferred to the journal: over the bound, or unapplied at shutdown
        self.replayed = 0  # loaded back from the journal (processes that ended, or spilled)
        self.releases_dropped = 0  # releases given up (queue full, shutdown): no spend in them
        self.outcomes: dict[str, int] = {}
