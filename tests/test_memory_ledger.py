"""What only the memory ledger has to prove: its bookkeeping stays bounded on a busy budget.

The ledger semantics themselves are proven for every backend in ``test_ledger.py``.
"""

from __future__ import annotations

from budget_middleware import HoldRequest, MemoryLedger, Reservation, Settlement
from budget_middleware.budgets import Budget
from budget_middleware.ledger import id_time_ms, new_reservation_id

BUDGET = Budget("user", "r:alice", 86_400_000)
LEASE_MS = 1_000


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


def reserve(ledger: MemoryLedger, amount: int = 1) -> Reservation:
    r = ledger.reserve_now(new_reservation_id(), [HoldRequest(BUDGET, 10**12, amount)], LEASE_MS)
    assert isinstance(r, Reservation)
    return r


def settle(ledger: MemoryLedger, r: Reservation, actual: int = 1) -> str:
    return ledger.settle_now(Settlement(r.id, r.holds, actual, "completed", 1)).outcome


def test_reservation_ids_are_32_hex_digits_carrying_their_creation_time() -> None:
    rid = new_reservation_id(1_800_000_000_123)
    assert len(rid) == 32
    assert set(rid) <= set("0123456789abcdef")
    assert id_time_ms(rid) == 1_800_000_000_123
    assert len({new_reservation_id() for _ in range(10_000)}) == 10_000


def test_settled_holds_do_not_pile_up_in_the_expiry_heap() -> None:
    ledger = MemoryLedger(clock=Clock())
    in_flight = [reserve(ledger) for _ in range(10)]
    for _ in range(5_000):
        assert settle(ledger, reserve(ledger)) == "applied"
    state = ledger._states[(BUDGET.rule, BUDGET.entity)]
    assert len(state.holds) == 10
    assert len(state.expiry_heap) <= 2 * 10 + 64 + 1
    for r in in_flight:
        assert settle(ledger, r) == "applied"
    assert state.expiry_heap == []


async def test_a_hold_still_expires_after_the_heap_was_rebuilt() -> None:
    clock = Clock()
    ledger = MemoryLedger(clock=clock)
    forgotten = reserve(ledger, amount=7)
    clock.now += LEASE_MS // 2
    for _ in range(500):  # enough settled entries to rebuild the heap several times
        settle(ledger, reserve(ledger))
    clock.now += LEASE_MS
    usage = await ledger.usage(BUDGET, 10**12)
    assert usage.purged == 1
    assert usage.held == 0
    assert usage.holds == 0
    assert settle(ledger, forgotten, actual=7) == "late"
    assert (await ledger.usage(BUDGET, 10**12)).spent == 500 + 7
