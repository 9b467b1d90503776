"""The operator's command line: ``python -m budget_middleware <command>``.

demo                      a budget reserved, settled and rejected, on the memory ledger
usage RULE ENTITY         a budget's spent, held and remaining in its current window
set-limit RULE ENTITY X   a per-entity limit override ("none" removes it)
reset RULE ENTITY         clear spent in the current window (live holds stay)
check                     validate BUDGET_*, warn about set-ups that do nothing or always
                          reject, and try the ledger's connection

The configuration comes from the same BUDGET_* variables as the app's. ENTITY is an id as requests
carry it (alice, 10.0.0.7, an API key) or the token these commands print for it (r:<id>, or
h:<32 hex digits> for a digest). Amounts are in BUDGET_UNIT, times in ISO 8601 UTC; --json prints
one JSON object for machines, with each amount also in micro-units (1e-6 of the unit).

usage, set-limit and reset act on the shared Redis ledger (BUDGET_REDIS_URL): the memory ledger
lives inside the app's own process, out of this command's reach. A mistake is one line on stderr
and a non-zero exit: 2 for what was typed or configured, 1 for a ledger that failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import parse_qsl

from .amounts import format_micros, to_micros
from .config import BudgetConfig, ConfigError, Rule
from .keys import Budget, EntityHasher
from .ledger import Ledger, LedgerError, Usage, redact_url
from .middleware import make_ledger
from .setup_checks import setup_warnings

__all__ = ["main"]

EXIT_LEDGER = 1  # the ledger failed or could not be reached
EXIT_USAGE = 2  # what was typed or configured is wrong (argparse's own code)
EXIT_INTERRUPTED = 130
# Each ledger call has its own socket timeout; this bounds a whole command (a slow Cluster discovery).
LEDGER_DEADLINE_S = 30.0
# The tokens these commands print: a raw id, or a digest (keys.py makes both).
_TOKEN = re.compile(r"r:[A-Za-z0-9._@-]{1,64}|h:[0-9a-f]{32}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS_MS = (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


class Refused(Exception):
    """A mistake the operator can fix, or a ledger that failed: one line on stderr, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (without the usage it prints first by default)."""

    def error(self, message: str) -> NoReturn:
        raise Refused(f"{self.prog}: {message} (see {self.prog} --help)")


class _Collected(logging.Handler):
    """The package's log lines (a Redis that may evict keys, say) while a command runs: printed
    as warnings when it succeeds, dropped when it fails (its one error line says why)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().removeprefix("budget: "))


def main(argv: Sequence[str] | None = None) -> int:
    logger = logging.getLogger("budget_middleware")
    collected, propagate = _Collected(), logger.propagate
    logger.addHandler(collected)
    logger.propagate = False
    try:
        code = _run(argv, collected)
        for message in collected.messages:
            print(f"warning: {_scrub(message)}", file=sys.stderr)
        return code
    except Refused as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of stdout left (`| head`): stop writing, and keep the exit's flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_LEDGER
    except Exception as exc:
        return _fail(f"unexpected error ({type(exc).__name__}: {exc}); please report it", EXIT_LEDGER)
    finally:
        logger.removeHandler(collected)
        logger.propagate = propagate


def _run(argv: Sequence[str] | None, collected: _Collected) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run

        asyncio.run(run())
        return 0
    try:
        config = BudgetConfig.from_env()
    except ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None
    if args.command == "check":
        return asyncio.run(_check(config, collected, as_json=args.json))
    if not config.redis_url:
        raise Refused(
            f"{args.command} needs BUDGET_REDIS_URL: without it the app uses a memory ledger, which "
            "lives inside the app's own process where this command cannot reach it"
        )
    rule, budget = _budget(config, args.rule, args.entity)
    limit = _limit(args.limit, config.unit) if args.command == "set-limit" else None
    usage = asyncio.run(_operate(config, args.command, rule, budget, limit))
    facts = _usage_facts(config, rule, usage)
    if args.json:
        print(json.dumps({"command": args.command, **facts}, indent=2))
        return 0
    if args.command == "set-limit":
        print(
            f"limit of {budget.entity} under rule {rule.name!r} set to {_money(limit, config.unit)}"
            if limit is not None
            else f"limit override of {budget.entity} under rule {rule.name!r} removed"
        )
    elif args.command == "reset":
        print(f"spend of {budget.entity} under rule {rule.name!r} cleared in the current window")
    digested = budget.entity.startswith("h:") and args.entity != budget.entity
    given = " (the digest of the id given)" if digested else ""
    print("\n".join(_usage_lines(facts, given)))
    return 0


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m budget_middleware",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="run the demo on the memory ledger")
    check = sub.add_parser("check", help="validate BUDGET_*, print warnings, try the ledger")
    check.add_argument("--json", action="store_true", help="one JSON object, for machines")
    commands = {
        "usage": "a budget's spent, held and remaining",
        "set-limit": 'a per-entity limit override ("none" removes it)',
        "reset": "clear spent in the current window",
    }
    for name, text in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("rule", help="the rule's name (the BUDGET_KEY/BUDGET_LIMIT rule is default)")
        p.add_argument("entity", help="the entity's id, or the r:/h: token printed for it")
        if name == "set-limit":
            p.add_argument("limit", help='an amount in the unit (such as 12.5), or "none"')
        p.add_argument("--json", action="store_true", help="one JSON object, for machines")
    return parser


def _fail(message: str, code: int) -> int:
    """Print ``message`` as one line on stderr, without any password of the Redis URL."""
    print(_scrub(" ".join(message.split())), file=sys.stderr)
    return code


def _scrub(text: str) -> str:
    url = os.environ.get("BUDGET_REDIS_URL", "").strip()
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0] if "@" in rest else ""
    secrets = [userinfo, userinfo.partition(":")[2]]
    secrets += [v for k, v in parse_qsl(rest.partition("?")[2]) if "pass" in k.lower()]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:  # shorter would mangle the message, and guards nothing
            text = text.replace(secret, "***")
    return text


# -- what the operator names ----------------------------------------------------------------------


def _budget(config: BudgetConfig, rule_name: str, entity: str) -> tuple[Rule, Budget]:
    """The budget of ``entity`` (an id, or the token printed for one) under rule ``rule_name``."""
    rule = next((r for r in config.rules if r.name == rule_name), None)
    if rule is None:
        if not config.rules:
            raise Refused(
                f"no rule named {rule_name!r}: no rules are configured "
                "(set BUDGET_KEY and BUDGET_LIMIT, or BUDGET_RULES)"
            )
        names = ", ".join(r.name for r in config.rules)
        raise Refused(f"no rule named {rule_name!r}; the rules are: {names}")
    if entity == "":
        raise Refused("the entity is empty: give the id requests carry, or its r:/h: token")
    # As the middleware decides: an id from a credential source is always digested.
    secret = rule.secret or (rule.source is not None and rule.source.secret)
    if _TOKEN.fullmatch(entity):  # no raw id has a colon, so this is a token, not an id
        if secret and entity.startswith("r:"):
            raise Refused(
                f"rule {rule.name!r} takes its ids from a credential ({rule.describe_source()}), "
                f"which is always digested: {entity!r} is none of its entities; give the id itself "
                "or its h: digest"
            )
        token = entity
    else:
        token = EntityHasher(config.secret).token(entity, secret=secret)
    return rule, Budget(rule.name, token, rule.period_ms)


def _limit(text: str, unit: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return to_micros(text, what="limit")
    except ValueError as exc:
        raise Refused(f"set-limit: {exc}; give an amount in {unit} (such as 12.5) or none") from None


# -- the ledger ------------------------------------------------------------------------------------


def _open(config: BudgetConfig) -> Ledger:
    try:
        return make_ledger(config)
    except ValueError as exc:
        raise _url_error(config, exc) from None


def _url_error(config: BudgetConfig, exc: ValueError) -> Refused:
    """A URL that the ledger (or redis-py, at the first call) cannot parse."""
    url = config.redis_url or ""
    # With credentials in it, the parser's words may quote a piece of the password.
    why = "it cannot be parsed (percent-encode a password's /, #, ? and @)" if "@" in url else exc
    return Refused(f"configuration error: BUDGET_REDIS_URL={redact_url(url)!r}: {why}")


async def _operate(
    config: BudgetConfig, command: str, rule: Rule, budget: Budget, limit: int | None
) -> Usage:
    """Runs ``command`` on the budget and reads it back."""
    ledger = _open(config)
    done = ""  # what was written before a failure, so that the error does not hide it
    try:
        async with asyncio.timeout(LEDGER_DEADLINE_S):
            if command == "set-limit":
                await ledger.set_limit(budget, limit)
                done = "the limit was set, but reading the budget back failed: "
            elif command == "reset":
                await ledger.reset(budget)
                done = "the spend was cleared, but reading the budget back failed: "
            return await ledger.usage(budget, rule.limit_micros)
    except TimeoutError:
        raise Refused(f"ledger error: {done}no answer in {LEDGER_DEADLINE_S:g} s", EXIT_LEDGER) from None
    except (LedgerError, OSError) as exc:
        raise Refused(f"ledger error: {done}{exc}", EXIT_LEDGER) from None
    except ValueError as exc:  # nothing was written: the URL is parsed before the first call
        raise _url_error(config, exc) from None
    finally:
        await ledger.aclose()


async def _ping(config: BudgetConfig) -> None:
    ledger = _open(config)
    try:
        async with asyncio.timeout(LEDGER_DEADLINE_S):
            # A read of a budget nobody uses: a round trip that runs a script and writes nothing.
            await ledger.usage(Budget("check", "anonymous", 0), 0)
    except TimeoutError:
        raise Refused(f"ledger error: no answer in {LEDGER_DEADLINE_S:g} s", EXIT_LEDGER) from None
    except (LedgerError, OSError) as exc:
        raise Refused(f"ledger error: {exc}", EXIT_LEDGER) from None
    except ValueError as exc:
        raise _url_error(config, exc) from None
    finally:
        await ledger.aclose()


# -- what is printed -------------------------------------------------------------------------------


def _usage_facts(config: BudgetConfig, rule: Rule, u: Usage) -> dict[str, Any]:
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
    facts["period"] = "lifetime" if lifetime else _duration(rule.period_ms)
    facts["window_start"] = None if lifetime else _iso(u.window)
    facts["window_start_ms"] = None if lifetime else u.window
    facts["reset"] = None if u.reset_ms is None else _iso(u.reset_ms)
    facts["reset_ms"] = u.reset_ms
    facts["now"] = _iso(u.now_ms)
    facts["now_ms"] = u.now_ms
    return facts


def _usage_lines(facts: dict[str, Any], given: str) -> list[str]:
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
    return _rows(
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


async def _check(config: BudgetConfig, collected: _Collected, *, as_json: bool) -> int:
    if config.redis_url:
        await _ping(config)
    warnings = setup_warnings(config, python_config=False, environ=os.environ)
    warnings += [_scrub(m) for m in collected.messages]
    collected.messages.clear()
    unit = config.unit
    facts: dict[str, Any] = {
        "ledger": redact_url(config.redis_url) if config.redis_url else "memory",
        "reachable": True if config.redis_url else None,
        "rules": [
            {
                "name": r.name,
                "limit": format_micros(r.limit_micros),
                "limit_micros": r.limit_micros,
                "period": _duration(r.period_ms) if r.period_ms else "lifetime",
                "period_ms": r.period_ms,
                "key": r.describe_source(),
                "on_missing": r.on_missing,
            }
            for r in config.rules
        ],
        "unit": unit,
        "estimate": format_micros(config.estimate),
        "estimate_micros": config.estimate,
        "max_hold": None if config.max_hold is None else format_micros(config.max_hold),
        "max_hold_micros": config.max_hold,
        "fail_mode": config.fail_mode,
        "prefix": config.prefix,
        "warnings": warnings,
    }
    if as_json:
        print(json.dumps(facts, indent=2))
        return 0
    ledger = (
        f"{facts['ledger']}: reachable"
        if config.redis_url
        else "memory (one per process; set BUDGET_REDIS_URL to share budgets)"
    )
    cap = "no cap" if config.max_hold is None else f"at most {_money(config.max_hold, unit)}"
    lines = _rows(
        [
            ("ledger", ledger),
            ("estimate", f"{_money(config.estimate, unit)} per request ({cap})"),
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
    lines += [f"warning: {w}" for w in warnings]
    print("\n".join(lines))
    return 0


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{label.ljust(width)}  {value}" for label, value in rows]


def _money(micros: int, unit: str) -> str:
    return f"{format_micros(micros)} {unit}"


def _iso(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC: ``2026-12-07T00:00:00Z`` (milliseconds when there are)."""
    when = _EPOCH + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def _duration(ms: int) -> str:
    """A period as BUDGET_PERIOD writes it: ``1d``, ``12h``, ``90s``, ``250ms``."""
    for suffix, size in _UNITS_MS:
        if ms % size == 0:
            return f"{ms // size}{suffix}"
    return f"{ms}ms"
