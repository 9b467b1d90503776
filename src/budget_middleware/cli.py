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
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, TypeVar
from urllib.parse import parse_qsl

from .amounts import to_micros
from .budgets import Budget
from .cli_format import check_facts, check_lines, money, usage_facts, usage_lines
from .config import BudgetConfig, ConfigError, Rule
from .identity import EntityHasher
from .ledger import Ledger, LedgerError, Usage, redact_url
from .middleware import make_ledger
from .setup_checks import setup_warnings

__all__ = ["main"]

T = TypeVar("T")

EXIT_LEDGER = 1  # the ledger failed or could not be reached
EXIT_USAGE = 2  # what was typed or configured is wrong (argparse's own code)
EXIT_INTERRUPTED = 130
# Each ledger call has its own socket timeout; this bounds a whole command (a slow Cluster discovery).
LEDGER_DEADLINE_S = 30.0
# The tokens these commands print: a raw id, or a digest (identity.py makes both).
_TOKEN = re.compile(r"r:[A-Za-z0-9._@-]{1,64}|h:[0-9a-f]{32}")


class _Refused(Exception):
    """A mistake the operator can fix, or a ledger that failed: one line on stderr, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (without the usage it prints first by default)."""

    def error(self, message: str) -> NoReturn:
        raise _Refused(f"{self.prog}: {message} (see {self.prog} --help)")


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
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        code = _run(argv, collected)
        for message in collected.messages:
            print(f"warning: {_scrub(message)}", file=sys.stderr)
        return code
    except _Refused as exc:
        return _fail(str(exc), exc.code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, as_json)
    except BrokenPipeError:
        # The reader of stdout left (`| head`): stop writing, and keep the exit's flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        why = f"unexpected error ({type(exc).__name__}: {exc}); please report it"
        return _fail(why, EXIT_LEDGER, as_json)
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
        raise _Refused(f"configuration error: {exc}") from None
    if args.command == "check":
        return asyncio.run(_check(config, collected, as_json=args.json))
    if not config.redis_url:
        raise _Refused(
            f"{args.command} needs BUDGET_REDIS_URL: without it the app uses a memory ledger, which "
            "lives inside the app's own process where this command cannot reach it"
        )
    rule, budget = _budget(config, args.rule, args.entity)
    limit = _limit(args.limit, config.unit) if args.command == "set-limit" else None
    usage = asyncio.run(_operate(config, args.command, rule, budget, limit))
    facts = usage_facts(config, rule, usage)
    if args.json:
        print(json.dumps({"command": args.command, **facts}, indent=2))
        return 0
    if args.command == "set-limit":
        print(
            f"limit of {budget.entity} under rule {rule.name!r} set to {money(limit, config.unit)}"
            if limit is not None
            else f"limit override of {budget.entity} under rule {rule.name!r} removed"
        )
    elif args.command == "reset":
        print(f"spend of {budget.entity} under rule {rule.name!r} cleared in the current window")
    digested = budget.entity.startswith("h:") and args.entity != budget.entity
    given = " (the digest of the id given)" if digested else ""
    print("\n".join(usage_lines(facts, given)))
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


def _fail(message: str, code: int, as_json: bool = False) -> int:
    """Print ``message`` as one line on stderr, without any password of the Redis URL; with
    ``--json``, that line is a JSON object: ``{"error": ..., "exit": ...}``."""
    line = _scrub(" ".join(message.split()))
    print(json.dumps({"error": line, "exit": code}) if as_json else line, file=sys.stderr)
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
            raise _Refused(
                f"no rule named {rule_name!r}: no rules are configured "
                "(set BUDGET_KEY and BUDGET_LIMIT, or BUDGET_RULES)"
            )
        names = ", ".join(r.name for r in config.rules)
        raise _Refused(f"no rule named {rule_name!r}; the rules are: {names}")
    if entity == "":
        raise _Refused("the entity is empty: give the id requests carry, or its r:/h: token")
    # As the middleware decides: an id from a credential source is always digested.
    secret = rule.secret or (rule.source is not None and rule.source.secret)
    if _TOKEN.fullmatch(entity):  # no raw id has a colon, so this is a token, not an id
        if secret and entity.startswith("r:"):
            raise _Refused(
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
        raise _Refused(f"set-limit: {exc}; give an amount in {unit} (such as 12.5) or none") from None


# -- the ledger ------------------------------------------------------------------------------------


def _open(config: BudgetConfig) -> Ledger:
    try:
        return make_ledger(config)
    except ValueError as exc:
        raise _url_error(config, exc) from None


def _url_error(config: BudgetConfig, exc: ValueError) -> _Refused:
    """A URL that the ledger (or redis-py, at the first call) cannot parse."""
    url = config.redis_url or ""
    # With credentials in it, the parser's words may quote a piece of the password.
    why = "it cannot be parsed (percent-encode a password's /, #, ? and @)" if "@" in url else exc
    return _Refused(f"configuration error: BUDGET_REDIS_URL={_shown_url(url)!r}: {why}")


async def _on_ledger(config: BudgetConfig, work: Callable[[Ledger, list[str]], Awaitable[T]]) -> T:
    """``await work(ledger, done)`` on a ledger made for the command, its failures turned into
    one line. ``work`` appends to ``done`` what it wrote, which an error must not hide."""
    ledger = _open(config)
    done: list[str] = []
    try:
        async with asyncio.timeout(LEDGER_DEADLINE_S):
            return await work(ledger, done)
    except TimeoutError:
        why = f"no answer in {LEDGER_DEADLINE_S:g} s"
        raise _Refused(f"ledger error: {''.join(done)}{why}", EXIT_LEDGER) from None
    except (LedgerError, OSError) as exc:
        raise _Refused(f"ledger error: {''.join(done)}{exc}", EXIT_LEDGER) from None
    except ValueError as exc:  # redis-py parses the URL at the first call, before any write
        raise _url_error(config, exc) from None
    finally:
        await ledger.aclose()


async def _operate(
    config: BudgetConfig, command: str, rule: Rule, budget: Budget, limit: int | None
) -> Usage:
    """Runs ``command`` on the budget and reads it back."""

    async def work(ledger: Ledger, done: list[str]) -> Usage:
        if command == "set-limit":
            await ledger.set_limit(budget, limit)
            done.append("the limit was set, but reading the budget back failed: ")
        elif command == "reset":
            await ledger.reset(budget)
            done.append("the spend was cleared, but reading the budget back failed: ")
        return await ledger.usage(budget, rule.limit_micros)

    return await _on_ledger(config, work)


async def _ping(config: BudgetConfig) -> None:
    async def work(ledger: Ledger, done: list[str]) -> None:
        # A read of a budget nobody uses: a round trip that runs a script and writes nothing.
        await ledger.usage(Budget("check", "anonymous", 0), 0)

    await _on_ledger(config, work)


def _shown_url(url: str) -> str:
    return _scrub(redact_url(url))


async def _check(config: BudgetConfig, collected: _Collected, *, as_json: bool) -> int:
    if config.redis_url:
        await _ping(config)
    warnings = setup_warnings(config, python_config=False, environ=os.environ)
    warnings += [_scrub(m) for m in collected.messages]
    collected.messages.clear()
    url = _shown_url(config.redis_url) if config.redis_url else None
    facts = check_facts(config, url, warnings)
    print(json.dumps(facts, indent=2) if as_json else "\n".join(check_lines(config, facts)))
    return 0
