"""What the operator commands print: aligned lines for people, one JSON object for machines.

Amounts are shown in the unit (``12.5 usd``), as decimal strings in JSON beside the micro-units
(``spent``, ``spent_micros``); times in ISO 8601 UTC (``2026-12-07T00:00:00Z``), in JSON beside
the epoch milliseconds (``reset``, ``reset_ms``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .amounts import format_micros
from .config import BudgetConfig, Rule
from .ledger import Usage

__all__ = [
    "check_facts",
    "check_lines",
    "duration",
    "iso",
    "money",
    "rows",
    "usage_facts",
    "usage_lines",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS_MS = (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


def usage_facts(config: BudgetConfig, rule: Rule, u: Usage) -> dict[str, Any]:
    """The budget as JSON: amounts as decimal strings (and ``*_micros``), times in ISO 8601 UTC
    (and ``*_ms``). ``record`` is false for a budget nothing has touched in this window."""
    override = u.limit != rule.limit_micros
    lifetime = not rule.period_ms
    facts: dict[str, Any] = {
        "rule": rule.name,
        "entity": u.budget.entity,
        "unit": config.unit,
        "record": bool(u.spent or u.held or u.holds or override),
        "override": override,
    }
    for name, micros in (
        ("limit", u.limit),
        ("rule_limit", rule.limit_micros),
        ("spent", u.spent),
        ("held", u.held),
        ("remaining", u.remaining),
    ):
        facts[name] = format_micros(micros)
        facts[f"{name}_micros"] = micros
    facts["holds"] = u.holds
    facts["period"] = "lifetime" if lifetime else duration(rule.period_ms)
    facts["window_start"] = None if lifetime else iso(u.window)
    facts["window_start_ms"] = None if lifetime else u.window
    facts["reset"] = None if u.reset_ms is None else iso(u.reset_ms)
    facts["reset_ms"] = u.reset_ms
    facts["now"] = iso(u.now_ms)
    facts["now_ms"] = u.now_ms
    return facts


def usage_lines(facts: dict[str, Any], given: str) -> list[str]:
    unit = facts["unit"]
    who = f"{facts['entity']} under rule {facts['rule']!r}"
    lifetime = facts["window_start"] is None
    window = "lifetime, never resets" if lifetime else f"{facts['window_start']} to {facts['reset']}"
    if not facts["record"]:
        return [
            f"no record of {who}{given} in this window ({window}): nothing spent, nothing held, "
            f"no live holds and no limit override (its limit is the rule's {facts['limit']} {unit})"
        ]
    limit = f"{facts['limit']} {unit}"
    if facts["override"]:
        limit += f" (a limit override; the rule's is {facts['rule_limit']} {unit})"
    holds = facts["holds"]
    period = ", a lifetime budget" if lifetime else f" per {facts['period']}"
    return rows(
        [
            ("rule", f"{facts['rule']} ({facts['rule_limit']} {unit}{period})"),
            ("entity", f"{facts['entity']}{given}"),
            ("limit", limit),
            ("spent", f"{facts['spent']} {unit}"),
            ("held", f"{facts['held']} {unit} in {holds} live hold{'' if holds == 1 else 's'}"),
            ("remaining", f"{facts['remaining']} {unit}"),
            ("window", window),
        ]
    )


def check_facts(config: BudgetConfig, url: str | None, warnings: list[str]) -> dict[str, Any]:
    """What ``check`` found, as JSON; ``url`` is the ledger's URL fit to print (None: memory)."""
    return {
        "ledger": url or "memory",
        "reachable": True if url else None,
        "rules": [
            {
                "name": r.name,
                "limit": format_micros(r.limit_micros),
                "limit_micros": r.limit_micros,
                "period": duration(r.period_ms) if r.period_ms else "lifetime",
                "period_ms": r.period_ms,
                "key": r.describe_source(),
                "on_missing": r.on_missing,
            }
            for r in config.rules
        ],
        "unit": config.unit,
        "estimate": format_micros(config.estimate),
        "estimate_micros": config.estimate,
        "max_hold": None if config.max_hold is None else format_micros(config.max_hold),
        "max_hold_micros": config.max_hold,
        "fail_mode": config.fail_mode,
        "prefix": config.prefix,
        "warnings": warnings,
    }


def check_lines(config: BudgetConfig, facts: dict[str, Any]) -> list[str]:
    unit = config.unit
    ledger = (
        f"{facts['ledger']}: reachable"
        if facts["reachable"]
        else "memory (one per process; set BUDGET_REDIS_URL to share budgets)"
    )
    cap = "no cap" if config.max_hold is None else f"at most {money(config.max_hold, unit)}"
    lines = rows(
        [
            ("ledger", ledger),
            ("estimate", f"{money(config.estimate, unit)} per request ({cap})"),
            ("fail mode", config.fail_mode),
            ("rules", str(len(config.rules)) if config.rules else "none"),
        ]
    )
    if config.rules:
        table = [("name", "limit", "per", "key", "on missing")] + [
            (r["name"], f"{r['limit']} {unit}", r["period"], r["key"], r["on_missing"])
            for r in facts["rules"]
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
    return lines + [f"warning: {w}" for w in facts["warnings"]]


def rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def money(micros: int, unit: str) -> str:
    return f"{format_micros(micros)} {unit}"


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC: ``2026-12-07T00:00:00Z`` (milliseconds when there are)."""
    when = _EPOCH + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def duration(ms: int) -> str:
    """A period as BUDGET_PERIOD writes it: ``1d``, ``12h``, ``90s``, ``250ms``."""
    for suffix, size in _UNITS_MS:
        if ms % size == 0:
            return f"{ms // size}{suffix}"
    return f"{ms}ms"
