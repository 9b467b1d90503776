"""budget-middleware: hard spend budgets for Starlette and FastAPI.

Reserve the worst-case cost on request entry, atomically; settle the actual cost exactly once when
the work ends, on every exit path; never leak a hold.
"""

from __future__ import annotations

from .amounts import format_micros, to_micros
from .budgets import Budget
from .config import BudgetConfig, ConfigError, Rule, parse_duration
from .costs import Estimator
from .finalizer import Finalizer
from .ledger import (
    HoldRequest,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    MemoryLedger,
    RedisClusterLedger,
    RedisLedger,
    RedisSentinelLedger,
    Rejection,
    Reservation,
    Settled,
    Settlement,
    Usage,
)
from .middleware import BudgetMiddleware, RequestBudget, get_reservation

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetConfig",
    "BudgetMiddleware",
    "ConfigError",
    "Estimator",
    "Finalizer",
    "HoldRequest",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "MemoryLedger",
    "RedisClusterLedger",
    "RedisLedger",
    "RedisSentinelLedger",
    "Rejection",
    "RequestBudget",
    "Reservation",
    "Rule",
    "Settled",
    "Settlement",
    "Usage",
    "__version__",
    "format_micros",
    "get_reservation",
    "parse_duration",
    "to_micros",
]
