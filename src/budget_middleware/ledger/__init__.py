"""Ledgers: the memory and Redis stores behind budgets, one contract (DESIGN.md section 4)."""

from __future__ import annotations

from ._types import (
    HeldBudget,
    HoldRequest,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Rejection,
    Renewed,
    Reservation,
    Settled,
    Settlement,
    SettleOutcome,
    Usage,
    Violation,
    id_time_ms,
    new_reservation_id,
)
from .memory import MemoryLedger
from .redis import RedisLedger, redact_url

__all__ = [
    "HeldBudget",
    "HoldRequest",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "MemoryLedger",
    "RedisLedger",
    "Rejection",
    "Renewed",
    "Reservation",
    "SettleOutcome",
    "Settled",
    "Settlement",
    "Usage",
    "Violation",
    "id_time_ms",
    "new_reservation_id",
    "redact_url",
]
