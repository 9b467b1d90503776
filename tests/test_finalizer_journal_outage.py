"""An outage while the journal writes: no settlement ends neither applied nor journaled.

The finalizer journals new settlements before it sends them, in a worker thread, while requests go
on handing more over. Those handed over during a write must be journaled by a later write (or at
shutdown) even if the batch that carried them fails: each settlement knows for itself whether it
is in the journal. The ledger here is the memory ledger made asynchronous (its settles go through
the worker) with a switch that makes every settle fail; the journal's writes are slowed to a few
milliseconds (a slow disk's fsync), so many settlements arrive while one is in progress.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import pytest

from asgi_helpers import wait_until
from budget_middleware.budgets import Budget
from budget_middleware.finalizer import Finalizer
from budget_middleware.journal import Journal, read_unapplied
from budget_middleware.ledger import (
    HoldRequest,
    LedgerUnavailable,
    MemoryLedger,
    Reservation,
    Settled,
    Settlement,
    new_reservation_id,
)

LIMIT = 10**15
USER = Budget("user", "r:alice", 0)


class SwitchableLedger(MemoryLedger):
    """The memory ledger, settled by the worker, whose settles fail while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.settle_now = None  # type: ignore[assignment]  # go through the worker
        self.down = False

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]:
        await anyio.lowlevel.checkpoint()
        if self.down:
            raise LedgerUnavailable("connection refused")
        return await super().settle_many(settlements)


class SlowJournal(Journal):
    """A journal whose every write takes a slow disk's fsync more (it runs in a worker thread)."""

    def write(self, settlements: Sequence[Settlement] = (), applied: Iterable[str] = ()) -> None:
        time.sleep(0.003)
        super().write(settlements, applied)


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.jsonl"))


def reserved(ledger: MemoryLedger, n: int) -> list[Settlement]:
    out = []
    for i in range(n):
        r = ledger.reserve_now(new_reservation_id(), [HoldRequest(USER, LIMIT, 5_000)], 600_000)
        assert isinstance(r, Reservation)
        out.append(Settlement(r.id, r.holds, 1_000 + i, "completed", 5_000))
    return out


async def test_settlements_handed_over_during_a_journal_write_are_not_lost_in_an_outage(
    tmp_path: Path,
) -> None:
    ledger = SwitchableLedger()
    settlements = reserved(ledger, 6000)
    applied: set[str] = set()
    fin = Finalizer(
        ledger,
        journal=SlowJournal(tmp_path),
        retry_base_s=0.002,
        retry_cap_s=0.01,
        on_settled=lambda s, _: applied.add(s.reservation_id),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        # Load: settlements keep coming, a few at a time, as requests end.
        for n, s in enumerate(settlements):
            fin.submit(s)
            if n == 2000:
                await wait_until(lambda: fin.applied > 0, what="a first applied batch")
                ledger.down = True  # the outage starts while settlements keep coming
            if n % 10 == 0:
                await anyio.sleep(0.0005)
        await wait_until(lambda: fin.retries >= 3, what="failed batches")
        lost = await fin.drain(0.5)  # a graceful shutdown, the ledger still down
        tg.cancel_scope.cancel()

    journaled = {s.reservation_id for path in journal_files(tmp_path) for s in read_unapplied(path)}
    submitted = {s.reservation_id for s in settlements}
    neither = submitted - applied - journaled
    assert applied, "nothing was applied before the outage"
    assert journaled, "nothing was journaled during the outage"
    assert len(neither) <= fin.lost == lost, (
        f"{len(neither)} settlements neither applied nor journaled, {fin.lost} counted lost "
        f"({len(applied)} applied, {len(journaled)} journaled)"
    )
    assert fin.lost == 0


@pytest.mark.parametrize("outage_first", [True, False], ids=["outage-first", "outage-later"])
async def test_every_settlement_is_journaled_or_applied_after_a_drain_that_times_out(
    tmp_path: Path, outage_first: bool
) -> None:
    """The same through the bookkeeping's other turns: the outage from the start, or after a few
    batches; a replay by the next finalizer applies exactly the ones the first left."""
    ledger = SwitchableLedger()
    ledger.down = outage_first
    settlements = reserved(ledger, 600)
    applied: set[str] = set()
    fin = Finalizer(
        ledger,
        journal=SlowJournal(tmp_path),
        retry_base_s=0.002,
        retry_cap_s=0.01,
        max_batch=16,
        on_settled=lambda s, _: applied.add(s.reservation_id),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(fin.run)
        for n, s in enumerate(settlements):
            fin.submit(s)
            if n == 300:
                ledger.down = True
            if n % 7 == 0:
                await anyio.sleep(0.0005)
        assert await fin.drain(0.2) == 0
        tg.cancel_scope.cancel()

    ledger.down = False
    second = Finalizer(
        ledger,
        journal=Journal(tmp_path),
        on_settled=lambda s, _: applied.add(s.reservation_id),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(second.run)
        await wait_until(lambda: second.replayed > 0 and second.pending == 0, what="the replay")
        assert await second.drain(2) == 0
        tg.cancel_scope.cancel()
    assert applied == {s.reservation_id for s in settlements}
    usage = await ledger.usage(USER, LIMIT)
    assert (usage.spent, usage.held) == (sum(s.actual for s in settlements), 0)
