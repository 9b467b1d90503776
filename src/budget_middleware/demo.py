"""``python -m budget_middleware demo``: a budget reserved, settled and rejected, on the memory ledger.

A tiny raw-ASGI "LLM" app behind the middleware, driven by hand-made requests: one completes, one
client leaves mid-stream, one app raises, and the last is rejected; the ledger is shown after each.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from .amounts import format_micros, to_micros
from .budgets import Budget
from .config import BudgetConfig, Rule
from .identity import EntityHasher
from .ledger import MemoryLedger
from .middleware import BudgetMiddleware, get_reservation

__all__ = ["run"]


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


async def run() -> None:
    """Print the demo's requests and the ledger after each."""
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
