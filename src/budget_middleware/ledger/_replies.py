"""The replies of the Redis scripts, read into the ledger's result types.

Each parser reads one script's reply as the script's opening comment describes it and raises
``LedgerError`` on anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..budgets import Budget
from ._types import (
    HeldBudget,
    HoldRequest,
    LedgerError,
    Rejection,
    Reservation,
    Settled,
    Settlement,
    Usage,
    Violation,
)

__all__ = ["UsageStep", "reserve_result", "settled", "usage_step"]

_OUTCOMES: frozenset[str] = frozenset({"applied", "late", "recovered", "duplicate", "stale"})


def _common_case(
    reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int, reply: str
) -> Reservation | Rejection:
    """The reply of one budget's common case (reserve.lua): a string of what the script read,
    '<status> <TIME s> <TIME us> <limit override or -> <held> <spent> <epoch>', from which the
    limit and what remains are worked out as the script did (the epoch holds a reservation id,
    which may be any string: it comes last)."""
    try:
        (h,) = holds
        status, seconds, micros, override, held_text, spent_text, epoch = reply.split(" ", 6)
        now = int(seconds) * 1000 + int(micros) // 1000
        limit = h.limit if override == "-" else int(override)
        held, spent = max(0, int(held_text)), int(spent_text)
    except ValueError:
        raise LedgerError(f"unexpected reserve reply {reply!r}") from None
    budget = h.budget
    window = budget.window_of(now)
    if status == "0":
        violation = Violation(budget, limit, spent, held, h.amount, budget.reset_ms(window), now)
        return Rejection(reservation_id, (violation,), 0, ())
    remaining = limit - spent - held - h.amount
    hold = HeldBudget(budget, h.amount, window, epoch, limit, remaining, budget.reset_ms(window), now)
    return Reservation(reservation_id, (hold,), lease_ms, now, 0, (), False)


@dataclass(slots=True)
class UsageStep:
    """One call of usage.lua: the budget's state (``holds`` the live holds of this call's batch),
    whether a purge pass is still under way, and the count's next cursor ('' for no count)."""

    usage: Usage
    under_way: bool
    cursor: str


def reserve_result(
    reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int, reply: Any
) -> Reservation | Rejection:
    """The reply of reserve.lua: one budget's common case (a string), or the flat array."""
    if isinstance(reply, str):
        return _common_case(reservation_id, holds, lease_ms, reply)
    # One flat array: status, now, k, k expired ids, then a row per budget (reserve.lua).
    status, now, k = int(reply[0]), int(reply[1]), int(reply[2])
    expired = tuple(str(x) for x in reply[3 : 3 + k])
    width = 4 if status == 0 else 3
    rows = [reply[i : i + width] for i in range(3 + k, len(reply), width)]
    if len(rows) != len(holds):
        raise LedgerError(f"unexpected reserve reply {reply!r}")
    if status == 0:
        violations = tuple(
            Violation(
                h.budget,
                int(limit),
                int(spent),
                int(held),
                h.amount,
                h.budget.reset_ms(h.budget.window_of(now)),
                now,
            )
            for h, (limit, spent, held, ok) in zip(holds, rows, strict=True)
            if not ok
        )
        return Rejection(reservation_id, violations, k, expired)
    held = tuple(
        HeldBudget(
            h.budget,
            h.amount,
            window := h.budget.window_of(now),
            str(epoch),
            int(limit),
            int(remaining),
            h.budget.reset_ms(window),
            now,
        )
        for h, (epoch, limit, remaining) in zip(holds, rows, strict=True)
    )
    return Reservation(reservation_id, held, lease_ms, now, k, expired, status == 2)


def settled(s: Settlement, reply: Any) -> Settled:
    """The reply of settle.lua: an outcome per budget, separated by spaces."""
    outcomes = tuple(str(reply).split(" "))
    if not all(o in _OUTCOMES for o in outcomes):
        raise LedgerError(f"unexpected settle reply {reply!r}")
    return Settled(s.reservation_id, outcomes)  # type: ignore[arg-type]


def usage_step(budget: Budget, reply: Any) -> UsageStep:
    """The reply of usage.lua: {now, window, limit, spent, held, purged, pass under way 1|0, live
    holds counted, cursor}."""
    try:
        now, window, eff_limit, spent, held, purged, under_way, live, cursor = reply
        window = int(window)
        usage = Usage(
            budget,
            int(eff_limit),
            int(spent),
            int(held),
            int(live),
            window,
            budget.reset_ms(window),
            int(now),
            int(purged),
        )
    except (TypeError, ValueError):
        raise LedgerError(f"unexpected usage reply {reply!r}") from None
    return UsageStep(usage, bool(int(under_way)), str(cursor))
