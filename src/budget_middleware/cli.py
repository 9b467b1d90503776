"""The operator's command line: ``python -m budget_middleware <command>``.

demo                      a budget reserved, settled and rejected, on the memory ledger
usage RULE ENTITY         a budget's spent, held and remaining (config from BUDGET_*)
set-limit RULE ENTITY X   a per-entity limit override ("none" removes it)
reset RULE ENTITY         clear spent in the current window
check                     validate BUDGET_* and the ledger's connection; print the configuration

usage, set-limit and reset act on the shared Redis ledger (BUDGET_REDIS_URL): the memory ledger
lives inside the app's own process, out of this command's reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from .amounts import format_micros, to_micros
from .budgets import Budget
from .config import BudgetConfig, ConfigError, Rule
from .identity import EntityHasher
from .ledger import Ledger, LedgerError, MemoryLedger
from .middleware import BudgetMiddleware, get_reservation, make_ledger

__all__ = ["main"]


# -- demo ---------------------------------------------------------------------------------------


async def _demo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A tiny raw-ASGI "LLM" app: /chat charges a fixed cost, /stream charges per chunk."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    from starlette.requests import Request

    request = Request(scope, receive)
    budget = get_reservation(request)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/boom":
        raise RuntimeError("the upstream model failed")
    if scope["path"] == "/stream":
        for _ in range(5):
            budget.charge("0.05")
            await send({"type": "http.response.body", "body": b"token ", "more_body": True})
            await asyncio.sleep(0)
    else:
        budget.charge("0.30")
    await send({"type": "http.response.body", "body": b"done", "more_body": False})


async def _call(
    app: Any, path: str, user: str, *, disconnect_after: int | None = None
) -> tuple[int, dict[str, str], str]:
    """Drive one request by hand, optionally with a client that leaves after N body chunks."""
    got: list[Message] = []
    left = asyncio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"x-end-user-id", user.encode())],
    }
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        got.append(message)
        bodies = sum(1 for m in got if m["type"] == "http.response.body")
        if disconnect_after is not None and bodies >= disconnect_after:
            left.set()
            raise OSError("client went away")

    try:
        await app(scope, receive, send)
    except OSError:
        pass  # the client left: the server would drop the connection
    except RuntimeError as exc:
        return 500, {}, f"app raised {type(exc).__name__}: {exc}"
    start: Message = next((m for m in got if m["type"] == "http.response.start"), {"status": 0})
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in got if m["type"] == "http.response.body")
    return start["status"], headers, body.decode()


async def _demo() -> None:
    ledger = MemoryLedger()
    rule = Rule("user-daily", "header:x-end-user-id", "1.00", "1d")
    config = BudgetConfig(rules=(rule,), estimate=to_micros("0.40"))
    app = BudgetMiddleware(_demo_app, config, ledger=ledger)
    budget = Budget(rule.name, EntityHasher().token("alice"), rule.period_ms)

    async def show(note: str) -> None:
        await app.finalizer.wait_idle(5)
        u = await ledger.usage(budget, rule.limit_micros)
        print(
            f"    ledger: spent {format_micros(u.spent)}, held {format_micros(u.held)}, "
            f"remaining {format_micros(u.remaining)} of {format_micros(u.limit)} usd  ({note})"
        )

    print("budget-middleware demo: rule user-daily = 1.00 usd per day per x-end-user-id,")
    print("each request reserves an estimate of 0.40 usd and settles what it really cost.\n")
    lifespan_in: asyncio.Queue[Message] = asyncio.Queue()
    lifespan_out: asyncio.Queue[Message] = asyncio.Queue()

    async def lifespan_send(m: Message) -> None:
        await lifespan_out.put(m)

    life = asyncio.create_task(app({"type": "lifespan"}, lifespan_in.get, lifespan_send))
    await lifespan_in.put({"type": "lifespan.startup"})
    print(f"startup -> {(await lifespan_out.get())['type']} (the finalizer is running)\n")

    steps = [
        ("/chat", None, "completed: charged 0.30 as reported, the 0.40 hold released"),
        ("/stream", 2, "client left after 2 chunks: disconnected, charged the 0.10 used"),
        ("/boom", None, "app raised: error, charged what it reported (nothing: zero)"),
        ("/chat", None, "completed again"),
        ("/chat", None, "0.40 more would pass 1.00: rejected, the app is not called"),
    ]
    for path, leave, note in steps:
        status, headers, body = await _call(app, path, "alice", disconnect_after=leave)
        shown = f"{status}, client gone" if leave else str(status)
        print(f"GET {path:<8} -> {shown}  {note}")
        if "ratelimit" in headers:
            print(f"    RateLimit: {headers['ratelimit']}")
        if status == 429:
            detail = json.loads(body)["detail"]
            print(f"    Retry-After: {headers.get('retry-after')}  {detail}")
        await show(path)
    await lifespan_in.put({"type": "lifespan.shutdown"})
    print(f"\nshutdown -> {(await lifespan_out.get())['type']} (the finalizer drained)")
    await life
    print(
        f"settlements applied: {app.finalizer.applied}, outcomes {app.finalizer.outcomes}, "
        f"lost: {app.finalizer.lost}"
    )


# -- operator commands --------------------------------------------------------------------------


def _budget(config: BudgetConfig, rule_name: str, entity: str) -> tuple[Rule, Budget]:
    for rule in config.rules:
        if rule.name == rule_name:
            secret = rule.source.secret if rule.source is not None else rule.secret
            token = EntityHasher(config.secret).token(entity, secret=secret)
            return rule, Budget(rule.name, token, rule.period_ms)
    raise SystemExit(f"no rule named {rule_name!r}; configured: {[r.name for r in config.rules]}")


async def _operate(args: argparse.Namespace, config: BudgetConfig) -> int:
    ledger: Ledger = make_ledger(config)
    try:
        rule, budget = _budget(config, args.rule, args.entity)
        if args.command == "set-limit":
            value = None if args.limit.lower() == "none" else to_micros(args.limit, what="limit")
            await ledger.set_limit(budget, value)
        elif args.command == "reset":
            await ledger.reset(budget)
        u = await ledger.usage(budget, rule.limit_micros)
        print(
            json.dumps(
                {
                    "rule": rule.name,
                    "entity": budget.entity,
                    "unit": config.unit,
                    "limit": format_micros(u.limit),
                    "spent": format_micros(u.spent),
                    "held": format_micros(u.held),
                    "remaining": format_micros(u.remaining),
                    "live_holds": u.holds,
                    "window_start_ms": u.window,
                    "reset_ms": u.reset_ms,
                },
                indent=2,
            )
        )
        return 0
    finally:
        await ledger.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m budget_middleware",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo on the memory ledger")
    sub.add_parser("check", help="validate BUDGET_* and the ledger's connection")
    commands = {
        "usage": "a budget's spent, held and remaining",
        "set-limit": 'a per-entity limit override ("none" removes it)',
        "reset": "clear spent in the current window",
    }
    for name, text in commands.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("rule", help="the rule's name (the shorthand rule is called default)")
        p.add_argument("entity", help="the entity id, as the request carries it")
        if name == "set-limit":
            p.add_argument("limit", help='an amount in the unit, or "none"')
    args = parser.parse_args(argv)
    if args.command == "demo":
        asyncio.run(_demo())
        return 0
    try:
        config = BudgetConfig.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command != "check" and not config.redis_url:
        print(
            f"{args.command} needs BUDGET_REDIS_URL: without it the app uses a memory ledger that "
            "lives inside its own process, which this command cannot reach",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "check":
            return asyncio.run(_check(config))
        return asyncio.run(_operate(args, config))
    except LedgerError as exc:
        print(f"ledger error: {exc}", file=sys.stderr)
        return 1


async def _check(config: BudgetConfig) -> int:
    print(config.describe())
    if not config.redis_url:
        print("ledger: memory (per process; set BUDGET_REDIS_URL to share budgets)")
        return 0
    ledger = make_ledger(config)
    try:
        # A read of a budget nobody uses: a round trip that runs a script and writes nothing.
        await ledger.usage(Budget("check", "anonymous", 0), 0)
    finally:
        await ledger.aclose()
    print("ledger: reachable")
    return 0
