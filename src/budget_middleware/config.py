"""Configuration: rules, durations, and ``BudgetConfig.from_env()`` (ARCHITECTURE.md section 8).

Every setting can come from ``BUDGET_*`` environment variables (read with ``starlette.config``) or be
passed in Python. A malformed variable fails at start-up with a message naming it and its value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from starlette.config import Config, Environ
from starlette.requests import Request

from .amounts import Amount, format_micros, to_micros
from .budgets import validate_name
from .identity import KeySource

__all__ = [
    "BudgetConfig",
    "ConfigError",
    "Rule",
    "parse_duration",
]

OnMissing = Literal["skip", "reject", "anonymous"]
FailMode = Literal["closed", "open"]
ChargeChoice = Literal["estimate", "zero"]
ErrorFormat = Literal["problem", "openai"]
EntityResolver = Callable[[Request], "Awaitable[str | None] | str | None"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "redis+sentinel://")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


class ConfigError(ValueError):
    """A setting is malformed; the message names the setting and the bad value."""


def parse_duration(value: str | int | float, *, what: str = "duration") -> int:
    """``250ms``, ``30s``, ``15m``, ``1h``, ``1d``, ``7d`` or plain seconds, to milliseconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a positive duration, got {value!r}")
        ms = round(value * 1000)
    else:
        m = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise ValueError(
                f"{what} {value!r} is not a duration: use 250ms, 30s, 15m, 1h, 1d, 7d or plain seconds"
            )
        number, unit = m.groups()
        ms = round(float(number) * _UNIT_MS[(unit or "s").lower()])
    if ms <= 0:
        raise ValueError(f"{what} must be at least 1ms, got {value!r}")
    return ms


def parse_period(value: str | int | float | None) -> int:
    """A rule's period in ms; ``none`` (or None) is a lifetime budget (0)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "lifetime")):
        return 0
    return parse_duration(value, what="period")


@dataclass(frozen=True)
class Rule:
    """A named budget policy: where the entity comes from, the limit, the period.

    ``key`` is a key source string (``header:x-end-user-id``, ``bearer``, ``query:user``,
    ``client``, ``user``, ``const:global``) or a callable ``(request) -> id | None``, sync or async,
    that may look the id up after authentication (an API key to its team, say).
    ``on_missing``: ``skip`` (the rule does not apply), ``reject`` (401), or ``anonymous`` (one
    shared budget for every request without an id).
    """

    name: str
    key: str | EntityResolver
    limit: Amount
    period: str | int | float | None = "1d"
    on_missing: OnMissing = "skip"
    secret: bool = False
    limit_micros: int = field(init=False, repr=False)
    period_ms: int = field(init=False, repr=False)
    source: KeySource | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        validate_name(self.name, "rule name")
        set_ = object.__setattr__
        set_(self, "limit_micros", to_micros(self.limit, what=f"limit of rule {self.name!r}"))
        try:
            set_(self, "period_ms", parse_period(self.period))
        except ValueError as exc:
            raise ValueError(f"rule {self.name!r}: {exc}") from None
        if self.on_missing not in ("skip", "reject", "anonymous"):
            raise ValueError(
                f"rule {self.name!r}: on_missing must be skip, reject or anonymous, "
                f"got {self.on_missing!r}"
            )
        if callable(self.key):
            set_(self, "source", None)
        else:
            try:
                set_(self, "source", KeySource.parse(self.key, secret=self.secret))
            except ValueError as exc:
                raise ValueError(f"rule {self.name!r}: {exc}") from None

    @property
    def period_seconds(self) -> int | None:
        return self.period_ms // 1000 if self.period_ms else None

    def describe_source(self) -> str:
        return str(self.source) if self.source is not None else "identify callable"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping):
            raise ValueError(f"each rule must be a JSON object, got {data!r}")
        unknown = set(data) - {"name", "key", "limit", "period", "on_missing", "secret"}
        if unknown:
            raise ValueError(f"rule has unknown fields {sorted(unknown)}")
        for required in ("name", "key", "limit"):
            if required not in data:
                raise ValueError(f"rule {data.get('name', '?')!r} is missing {required!r}")
        limit = data["limit"]
        if not isinstance(limit, (str, int, float)) or isinstance(limit, bool):
            raise ValueError(f"rule {data['name']!r}: limit must be a number or decimal string")
        secret = data.get("secret", False)
        if not isinstance(secret, bool):
            raise ValueError(f"rule {data['name']!r}: secret must be true or false")
        return cls(
            name=data["name"],
            key=data["key"],
            limit=limit,
            period=data.get("period", "1d"),
            on_missing=data.get("on_missing", "skip"),
            secret=secret,
        )


@dataclass(frozen=True)
class BudgetConfig:
    """Everything the middleware needs. Amounts are micro-units, durations milliseconds."""

    rules: tuple[Rule, ...] = ()
    redis_url: str | None = field(default=None, repr=False)
    estimate: int = 0
    max_hold: int | None = None
    secret: str | None = field(default=None, repr=False)
    lease_ms: int = 60_000
    fail_mode: FailMode = "closed"
    exclude: tuple[str, ...] = ()
    prefix: str = "budget"
    unit: str = "usd"
    error_format: ErrorFormat = "problem"
    charge_on_disconnect: ChargeChoice = "estimate"
    charge_on_error: ChargeChoice = "zero"
    charge_on_cancel: ChargeChoice = "estimate"
    charge_header: str = "x-budget-charge"
    drain_timeout_ms: int = 10_000
    timeout_ms: int = 2_000
    horizon_ms: int = 86_400_000
    hold_retry_after_s: int = 1
    wait_replicas: int = 0
    span_raw_ids: bool = False
    journal_dir: str | None = None
    max_pending: int = 100_000

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"duplicate rule names: {', '.join(dupes)}")
        validate_name(self.prefix, "key prefix")
        if self.fail_mode not in ("closed", "open"):
            raise ConfigError(f"fail_mode must be closed or open, got {self.fail_mode!r}")
        if self.error_format not in ("problem", "openai"):
            raise ConfigError(f"error_format must be problem or openai, got {self.error_format!r}")
        for name in ("charge_on_disconnect", "charge_on_error", "charge_on_cancel"):
            if getattr(self, name) not in ("estimate", "zero"):
                raise ConfigError(f"{name} must be estimate or zero, got {getattr(self, name)!r}")
        if self.horizon_ms < self.lease_ms:
            raise ConfigError("the tombstone horizon must be at least the lease")
        if not re.fullmatch(r"[a-z0-9-]{1,64}", self.charge_header):
            raise ConfigError(
                f"charge_header must be a lower-case header name, got {self.charge_header!r}"
            )
        if self.max_pending < 1:
            raise ConfigError(f"max_pending must be at least 1, got {self.max_pending!r}")
        for path in self.exclude:
            if not path.startswith("/"):
                raise ConfigError(f"exclude paths must start with '/', got {path!r}")

    def with_rules(self, *rules: Rule) -> BudgetConfig:
        return replace(self, rules=rules)

    def describe(self) -> str:
        """A one-line summary for start-up logs; never contains secrets."""
        from .ledger.urls import redact_url

        store = redact_url(self.redis_url) if self.redis_url else "memory"
        rules = ", ".join(
            f"{r.name}={format_micros(r.limit_micros)} {self.unit}/"
            f"{'lifetime' if not r.period_ms else f'{r.period_ms}ms'} by {r.describe_source()}"
            for r in self.rules
        )
        return f"ledger={store} rules=[{rules}] fail_mode={self.fail_mode}"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, env_file: str | None = None
    ) -> BudgetConfig:
        """Read ``BUDGET_*`` variables (and an optional ``.env`` file) into a config."""
        env = Config(
            env_file=env_file,
            environ=Environ(dict(environ)) if environ is not None else Config().environ,
        )
        return _from_config(env)


def _from_config(env: Config) -> BudgetConfig:
    def raw(name: str) -> str | None:
        value = env.get(name, default=None)
        return None if value is None or value.strip() == "" else value.strip()

    def parse(name: str, fn: Callable[[str], Any]) -> Any:
        value = raw(name)
        if value is None:
            return None
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}={value!r}: {exc}") from None

    def choice(name: str, options: tuple[str, ...]) -> Any:
        def check(v: str) -> str:
            v = v.lower()
            if v not in options:
                raise ValueError(f"must be one of {', '.join(options)}")
            return v

        return parse(name, check)

    def money(name: str) -> int | None:
        result: int | None = parse(name, lambda v: to_micros(v, what="amount"))
        return result

    def duration(name: str) -> int | None:
        result: int | None = parse(name, lambda v: parse_duration(v, what="duration"))
        return result

    def flag(v: str) -> bool:
        low = v.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")

    def whole(v: str) -> int:
        try:
            return int(v)
        except ValueError:
            raise ValueError("must be a whole number") from None

    def positive(v: str) -> int:
        n = whole(v)
        if n < 1:
            raise ValueError("must be at least 1")
        return n

    def count(v: str) -> int:
        n = whole(v)
        if n < 0:
            raise ValueError("must not be negative")
        return n

    rules: list[Rule] = []
    rules_json = raw("BUDGET_RULES")
    if rules_json is not None:
        try:
            data = json.loads(rules_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"BUDGET_RULES is not valid JSON ({exc.msg}): {rules_json!r}") from None
        if not isinstance(data, list):
            raise ConfigError(f"BUDGET_RULES must be a JSON list of rules, got {rules_json!r}")
        for item in data:
            try:
                rules.append(Rule.from_dict(item))
            except ValueError as exc:
                raise ConfigError(f"BUDGET_RULES: {exc}") from None
    key, limit = raw("BUDGET_KEY"), raw("BUDGET_LIMIT")
    if key is not None or limit is not None:
        if key is None or limit is None:
            raise ConfigError("BUDGET_KEY and BUDGET_LIMIT must be set together")
        try:
            rules.append(Rule("default", key, limit, raw("BUDGET_PERIOD") or "1d"))
        except ValueError as exc:
            raise ConfigError(
                f"BUDGET_KEY={key!r} / BUDGET_LIMIT={limit!r} / "
                f"BUDGET_PERIOD={raw('BUDGET_PERIOD')!r}: {exc}"
            ) from None
    elif raw("BUDGET_PERIOD") is not None:
        raise ConfigError("BUDGET_PERIOD is set without BUDGET_KEY and BUDGET_LIMIT")

    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"BUDGET_RULES: duplicate rule names: {', '.join(dupes)}")

    redis_url = raw("BUDGET_REDIS_URL")
    if redis_url is not None:
        from .ledger.urls import check_redis_url, redact_url

        try:
            check_redis_url(redis_url)
        except ValueError as exc:
            raise ConfigError(f"BUDGET_REDIS_URL={redact_url(redis_url)!r}: {exc}") from None
    prefix = raw("BUDGET_PREFIX")
    if prefix is not None:
        parse("BUDGET_PREFIX", lambda v: validate_name(v, "key prefix"))
    exclude = parse("BUDGET_EXCLUDE", lambda v: tuple(p.strip() for p in v.split(",") if p.strip()))
    unit = parse("BUDGET_UNIT", lambda v: validate_name(v, "unit"))

    values: dict[str, Any] = {
        "rules": tuple(rules),
        "redis_url": redis_url,
        "estimate": money("BUDGET_ESTIMATE"),
        "max_hold": money("BUDGET_MAX_HOLD"),
        "secret": raw("BUDGET_SECRET"),
        "lease_ms": duration("BUDGET_LEASE"),
        "fail_mode": choice("BUDGET_FAIL_MODE", ("closed", "open")),
        "exclude": exclude,
        "prefix": prefix,
        "unit": unit,
        "error_format": choice("BUDGET_ERROR_FORMAT", ("problem", "openai")),
        "charge_on_disconnect": choice("BUDGET_CHARGE_ON_DISCONNECT", ("estimate", "zero")),
        "charge_on_error": choice("BUDGET_CHARGE_ON_ERROR", ("estimate", "zero")),
        "charge_on_cancel": choice("BUDGET_CHARGE_ON_CANCEL", ("estimate", "zero")),
        "charge_header": parse("BUDGET_CHARGE_HEADER", lambda v: v.lower()),
        "drain_timeout_ms": duration("BUDGET_DRAIN_TIMEOUT"),
        "timeout_ms": duration("BUDGET_TIMEOUT"),
        "horizon_ms": duration("BUDGET_HORIZON"),
        "hold_retry_after_s": parse(
            "BUDGET_HOLD_RETRY_AFTER", lambda v: max(1, round(parse_duration(v) / 1000))
        ),
        "wait_replicas": parse("BUDGET_WAIT_REPLICAS", count),
        "span_raw_ids": parse("BUDGET_SPAN_RAW_IDS", flag),
        "journal_dir": raw("BUDGET_JOURNAL"),
        "max_pending": parse("BUDGET_MAX_PENDING", positive),
    }
    for path in values["exclude"] or ():
        if not path.startswith("/"):
            raise ConfigError(
                f"BUDGET_EXCLUDE={raw('BUDGET_EXCLUDE')!r}: paths must start with '/', got {path!r}"
            )
    header = values["charge_header"]
    if header is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", header):
        raise ConfigError(f"BUDGET_CHARGE_HEADER={raw('BUDGET_CHARGE_HEADER')!r}: not a header name")
    lease = values["lease_ms"] or BudgetConfig.lease_ms
    horizon = values["horizon_ms"] or BudgetConfig.horizon_ms
    if horizon < lease:
        raise ConfigError(
            f"BUDGET_LEASE={raw('BUDGET_LEASE') or '60s'!r} is longer than "
            f"BUDGET_HORIZON={raw('BUDGET_HORIZON') or '24h'!r}: the horizon must be at least "
            "the lease"
        )
    try:
        return BudgetConfig(**{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"BUDGET_*: {exc}") from None
