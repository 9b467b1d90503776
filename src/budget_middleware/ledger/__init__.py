"""Ledgers: the memory and Redis stores behind budgets, one contract (DESIGN.md section 4)."""

from __future__ import annotations

from typing import Any

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


def redis_ledger_from_url(url: str, **options: Any) -> RedisLedger:
    """The Redis ledger for a ``BUDGET_REDIS_URL``: standalone (``redis://``, ``rediss://``,
    ``unix://``); Sentinel and Cluster URLs are added by their own modules."""
    return RedisLedger(url, **options)


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
    "redis_ledger_from_url",
]
