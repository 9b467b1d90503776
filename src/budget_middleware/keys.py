"""Entity ids, their sanitising, and the Redis key layout (DESIGN.md section 5).

An entity id is client data. In a key it is either raw, ``r:<id>``, when it is short, plain and not a
credential, or a digest, ``h:<hex>``, for anything else; the two namespaces never collide, and no
client byte can move the ``{hash tag}`` of a budget.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

__all__ = ["Budget", "EntityHasher", "KeyLayout", "validate_name"]

_RAW_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Used when no BUDGET_SECRET is set: digests are then stable but guessable for small id spaces.
_DEFAULT_KEY = b"budget-middleware/v1"


def validate_name(name: str, what: str) -> str:
    """Rule names and the key prefix: ``[A-Za-z0-9._-]{1,64}``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} must match [A-Za-z0-9._-]{{1,64}}, got {name!r}")
    return name


class EntityHasher:
    """Turns raw entity ids into key-safe tokens and span-safe digests."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self._key = secret or _DEFAULT_KEY

    def digest(self, raw: str | bytes) -> str:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        return "h:" + hmac.new(self._key, data, hashlib.sha256).hexdigest()[:32]

    def token(self, raw: str | bytes, *, secret: bool = False) -> str:
        """``r:<id>`` for a plain non-secret id, else ``h:<digest>``."""
        if not secret and isinstance(raw, str) and _RAW_ID.fullmatch(raw):
            return "r:" + raw
        return self.digest(raw)

    def for_span(self, token: str) -> str:
        """What telemetry may carry for an entity token: never the raw id."""
        return token if token.startswith("h:") else self.digest(token[2:])


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
    """``<prefix>:{<rule>:<entity>}:<part>``: every key of one budget shares one hash tag."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "budget") -> None:
        self.prefix = validate_name(prefix, "key prefix")

    def base(self, budget: Budget) -> str:
        return f"{self.prefix}:{{{budget.rule}:{budget.entity}}}"

    def state_keys(self, budget: Budget) -> list[str]:
        """The fixed keys of a budget, in the order every script expects them."""
        b = self.base(budget)
        return [f"{b}:held", f"{b}:holds", f"{b}:expired", f"{b}:epoch", f"{b}:limit", f"{b}:done"]

    def spent(self, budget: Budget, window: int) -> str:
        return f"{self.base(budget)}:spent:{window}"
