"""The ledger contract: result types and the ``Ledger`` protocol (ARCHITECTURE.md section 4)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from ..budgets import Budget

__all__ = [
    "HeldBudget",
    "HoldRequest",
    "Ledger",
    "LedgerError",
    "LedgerNotSent",
    "LedgerUnavailable",
    "Rejection",
    "Renewed",
    "Reservation",
    "SettleOutcome",
    "Settled",
    "Settlement",
    "SyncLedger",
    "Usage",
    "Violation",
    "admits",
    "check_lease",
    "id_time_ms",
    "new_reservation_id",
]

SettleOutcome = Literal["applied", "late", "recovered", "duplicate", "stale"]
# When the holds of one reservation end in different outcomes, the reservation reports the one that
# matters most to an operator: spend recovered from lost state first, a no-op last.
_OUTCOME_RANK: dict[SettleOutcome, int] = {
    "recovered": 0,
    "late": 1,
    "stale": 2,
    "applied": 3,
    "duplicate": 4,
}

_HEX = frozenset("0123456789abcdef")
_random_bits = random.getrandbits
_time_ns = time.time_ns


def new_reservation_id(now_ms: int | None = None) -> str:
    """A time-ordered random id: 48 bits of creation time (ms) and 80 random bits, 32 hex digits.

    The creation time lets a settle refuse an id older than the tombstone horizon without a lookup.
    ``random`` is reseeded in every forked process, and ids need to be unique, not secret. Made on
    every request: one integer turned into bytes and hex is about half the cost of two formats.
    """
    ms = _time_ns() // 1_000_000 if now_ms is None else now_ms
    return (ms << 80 | _random_bits(80)).to_bytes(16, "big").hex()


def id_time_ms(reservation_id: str) -> int:
    """The creation time carried by a reservation id (0 if it is not one of ours)."""
    head = reservation_id[:12]
    if len(reservation_id) != 32 or not _HEX.issuperset(head):
        return 0
    return int(head, 16)


def check_lease(lease_ms: int, horizon_ms: int) -> None:
    """A lease must be positive and no longer than the tombstone horizon.

    Every write gives a budget's keys a TTL of lease + horizon; with every lease at most the horizon,
    a write with a short lease can never end the life of a longer hold already in the keys.
    """
    if not 0 < lease_ms <= horizon_ms:
        raise ValueError(f"lease {lease_ms} ms must be positive and at most the horizon {horizon_ms} ms")


def admits(limit: int, spent: int, held: int, amount: int) -> bool:
    """The admission rule, the one place it is written in Python (``reserve.lua``'s ``admits`` is
    Redis's): a hold of ``amount`` is admitted only while the budget has room, ``remaining > 0``,
    and it fits, ``spent + held + amount <= limit``, so a zero estimate cannot pass an exhausted
    budget."""
    left = limit - spent - held
    return left > 0 and amount <= left


class LedgerError(Exception):
    """The ledger could not answer; the outcome of the call may be unknown."""


class LedgerUnavailable(LedgerError):
    """The ledger's store is unreachable (connection refused, timed out, no primary)."""


class LedgerNotSent(LedgerUnavailable):
    """The call never reached the store (refused at connect time): nothing to undo."""


@dataclass(slots=True)
class HoldRequest:
    """One hold to take: ``amount`` on ``budget`` whose default limit is ``limit`` (micro-units)."""

    budget: Budget
    limit: int
    amount: int


@dataclass(slots=True)
class HeldBudget:
    """A hold that was taken: what a settlement needs to find it again, even after it expired.

    ``reserved_ms`` is the ledger's time when the hold was taken, so the ledger alone decides
    whether a settle is older than its tombstone horizon (0 when unknown: a settlement made before
    the field existed, or the release of a reserve whose reply never came; the reservation id's
    creation time then stands in). ``amount`` is what was asked for: the ledger releases and renews
    the amount it stored with the hold, never this one.
    """

    budget: Budget
    amount: int
    window: int
    epoch: str
    limit: int
    remaining: int
    reset_ms: int | None
    reserved_ms: int = 0


@dataclass(slots=True)
class Reservation:
    """The holds of one request, taken all-or-nothing under one id."""

    id: str
    holds: tuple[HeldBudget, ...]
    lease_ms: int
    now_ms: int
    purged: int = 0
    expired_ids: tuple[str, ...] = ()
    replayed: bool = False
    admitted: Literal[True] = True


@dataclass(slots=True)
class Violation:
    """One budget that refused a reservation."""

    budget: Budget
    limit: int
    spent: int
    held: int
    amount: int
    reset_ms: int | None
    now_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.held)

    @property
    def blocked_by_spend(self) -> bool:
        """True when spent alone refuses the request: waiting for holds to settle cannot help."""
        return self.spent >= self.limit or self.spent + self.amount > self.limit

    @property
    def reset_after(self) -> float | None:
        """Seconds until the window resets, None for a lifetime budget."""
        if self.reset_ms is None:
            return None
        return max(0.0, (self.reset_ms - self.now_ms) / 1000)


@dataclass(slots=True)
class Rejection:
    """A refused reservation: no hold was taken on any budget."""

    id: str
    violations: tuple[Violation, ...]
    purged: int = 0
    expired_ids: tuple[str, ...] = ()
    admitted: Literal[False] = False

    @property
    def rule(self) -> str:
        return self.violations[0].budget.rule


@dataclass(slots=True)
class Settlement:
    """Ending a reservation: remove its holds and add ``actual`` to spent, exactly once.

    ``holds`` with an empty ``epoch`` and ``window`` -1 come from a reserve whose reply never
    arrived: such a settlement must carry ``actual == 0`` and only releases what it finds.

    ``never_sent`` marks a release whose reserve provably never reached the store (it failed with
    ``LedgerNotSent``): there is nothing to release, and the finalizer does not queue it.

    ``journaled`` is the finalizer's own bookkeeping: set once this settlement is in its journal
    (written and fsync'd), so it knows for each one whether a crash now would lose it.
    """

    reservation_id: str
    holds: tuple[HeldBudget, ...]
    actual: int
    reason: str
    estimate: int = 0
    attempts: int = 0
    context: object = None  # telemetry: the reserve span's context, for the settle span's link
    trace_id: str = ""
    never_sent: bool = False
    journaled: bool = False
    refusals: int = 0  # the finalizer's: how often the store refused it (not an outage)


@dataclass(slots=True)
class Settled:
    """What a settle did, per hold and overall."""

    reservation_id: str
    outcomes: tuple[SettleOutcome, ...]

    @property
    def outcome(self) -> SettleOutcome:
        outcomes = self.outcomes
        if len(outcomes) == 1:  # one rule: the common case, asked once per settlement
            return outcomes[0]
        if not outcomes:
            return "duplicate"
        return min(outcomes, key=_OUTCOME_RANK.__getitem__)


@dataclass(slots=True)
class Renewed:
    """What a lease renewal found: renewed holds, tombstones held again, and holds gone."""

    renewed: int = 0
    reheld: int = 0
    missing: int = 0


@dataclass(slots=True)
class Usage:
    """A budget's state in its current window."""

    budget: Budget
    limit: int
    spent: int
    held: int
    holds: int
    window: int
    reset_ms: int | None
    now_ms: int
    purged: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.held)


class Ledger(Protocol):
    """The store behind budgets. Every backend passes the same test suite."""

    async def reserve(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection: ...

    async def settle(self, settlement: Settlement) -> Settled: ...

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[Settled]: ...

    async def extend(self, reservations: Sequence[Reservation], lease_ms: int) -> Renewed: ...

    async def usage(self, budget: Budget, limit: int) -> Usage: ...

    async def set_limit(self, budget: Budget, limit: int | None) -> None: ...

    async def reset(self, budget: Budget) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class SyncLedger(Protocol):
    """A ledger whose reserve and settle cannot block or fail halfway (the memory ledger).

    The middleware calls ``reserve_now`` without an await or a timeout, and the finalizer applies
    ``settle_now`` inside ``submit``. For such a ledger these two *are* the reserve and the settle:
    ``reserve`` and ``settle`` only wrap them, so a subclass that wants to see every call overrides
    these two.
    """

    def reserve_now(
        self, reservation_id: str, holds: Sequence[HoldRequest], lease_ms: int
    ) -> Reservation | Rejection: ...

    def settle_now(self, settlement: Settlement) -> Settled: ...
