"""Ledgers: the memory and Redis stores behind budgets, one contract (ARCHITECTURE.md section 4)."""

from __future__ import annotations

from typing import Any

from ._types import (
    HeldBudget,
    HoldRequest,
    Ledger,
    LedgerError,
    LedgerNotSent,
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
from .cluster import RedisClusterLedger
from .memory import MemoryLedger
from .redis import RedisLedger
from .sentinel import RedisSentinelLedger
from .urls import CLUSTER_SCHEME, SENTINEL_SCHEME, redact_url, scheme_of


def redis_ledger_from_url(url: str, **options: Any) -> RedisLedger:
    """The Redis ledger for a ``BUDGET_REDIS_URL``: standalone (``redis://``, ``rediss://``,
    ``unix://``), ``redis+cluster://host:port[,host:port...]`` (``RedisClusterLedger``) or
    ``redis+sentinel://host:port[,host:port...]/<service>`` (``RedisSentinelLedger``)."""
    scheme = scheme_of(url)
    if scheme == CLUSTER_SCHEME:
        return RedisClusterLedger(url, **options)
    if scheme == SENTINEL_SCHEME:
        return RedisSentinelLedger(url, **options)
    return RedisLedger(url, **options)


__all__ = [
    "HeldBudget",
    "HoldRequest",
    "Ledger",
    "LedgerError",
    "LedgerNotSent",
    "LedgerUnavailable",
    "MemoryLedger",
    "RedisClusterLedger",
    "RedisLedger",
    "RedisSentinelLedger",
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
