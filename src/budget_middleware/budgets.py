"""Budgets and where they live: the storage side of the package (ARCHITECTURE.md section 5).

A budget is one rule applied to one entity (an entity token made by ``identity.py``); ``KeyLayout``
names its Redis hash. The ledgers import this module only: nothing here knows of HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Budget", "KeyLayout", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_name(name: str, what: str) -> str:
    """Rule names and the key prefix: ``[A-Za-z0-9._-]{1,64}``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} must match [A-Za-z0-9._-]{{1,64}}, got {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class Budget:
    """One rule applied to one entity; ``period_ms == 0`` is a lifetime budget."""

    rule: str
    entity: str
    period_ms: int

    def window_of(self, now_ms: int) -> int:
        """Start of the window containing ``now_ms``, aligned to the UTC epoch (0 for lifetime)."""
        return now_ms - now_ms % self.period_ms if self.period_ms else 0

    def reset_ms(self, window: int) -> int | None:
        """End of ``window`` in epoch ms, or None for a lifetime budget."""
        return window + self.period_ms if self.period_ms else None


class KeyLayout:
    """``<prefix>:{<rule>:<entity>}``: one hash per budget, its entity inside the hash tag."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "budget") -> None:
        self.prefix = validate_name(prefix, "key prefix")

    def key(self, budget: Budget) -> str:
        """The budget's hash (its fields are listed in ``ledger/lua/_common.lua``)."""
        return f"{self.prefix}:{{{budget.rule}:{budget.entity}}}"
