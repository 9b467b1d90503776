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


def test_budgets_minted_by_throwaway_ids_are_forgotten_a_bounded_batch_at_a_time() -> None:
    """Before, every 10k operations the ledger walked every budget it knew (O(N) on the request
    path), and the period of each budget ever seen stayed in a dict that was never pruned."""
    from budget_middleware.ledger import memory

    clock = Clock()
    ledger = MemoryLedger(horizon_ms=60_000, clock=clock)
    for n in range(3_000):  # throwaway ids, one request each, settled with no spend
        b = Budget("user", f"r:u{n}", 86_400_000)
        r = ledger.reserve_now(new_reservation_id(clock.now), [HoldRequest(b, 10, 1)], LEASE_MS)
        assert isinstance(r, Reservation)
        ledger.settle_now(Settlement(r.id, r.holds, 0, "completed", 1))
    assert len(ledger._states) == 3_000
    assert not hasattr(ledger, "_periods")
    clock.now += 61_000  # every one of them idle past the horizon
    looked_at: list[int] = []
    sweep = ledger._sweep

    def counting_sweep(now: int) -> None:
        before = len(ledger._idle_heap)
        sweep(now)
        looked_at.append(before - len(ledger._idle_heap))

    ledger._sweep = counting_sweep  # type: ignore[method-assign]
    while len(ledger._states) > 1 and len(looked_at) < 100:
        reserve(ledger)  # the one busy budget keeps the ledger ticking
    assert ledger._states.keys() == {(BUDGET.rule, BUDGET.entity)}
    assert max(looked_at) <= memory._SWEEP_BATCH
    assert len(ledger._idle_heap) <= 2


def test_an_idle_budget_with_spend_keeps_its_spend_until_its_window_is_old() -> None:
    clock = Clock()
    ledger = MemoryLedger(horizon_ms=60_000, clock=clock)
    r = reserve(ledger)
    assert settle(ledger, r, actual=5) == "applied"
    clock.now += 61_000
    for _ in range(2_000):
        ledger._tick(clock.now)
    state = ledger._states[(BUDGET.rule, BUDGET.entity)]
    assert sum(state.spent.values()) == 5  # the window has not ended: its spend is the record
