"""A small Starlette app behind ``BudgetMiddleware``, served by real servers in ``test_servers.py``.

The middleware is configured only from ``BUDGET_*`` environment variables (no explicit config), as
an operator would run it. The budget rule is expected to key on a header (``BUDGET_KEY=header:x-user``)
so every test charges its own entity.

Every request the app sees, and every charge it makes, is appended to a ground-truth file
(``BUDGET_TEST_TRUTH``, one JSON object a line, one ``os.write`` per line on an ``O_APPEND`` file,
so lines of several processes never interleave and survive a SIGKILL). The tests compare what
the ledger recorded with what the app really charged. Records:

    {"ev": "start",  "pid", "entity", "rid", "est", "path"}   the app was called (admitted)
    {"ev": "charge", "pid", "entity", "rid", "amount"}        the app reported ``amount`` micro-units
    {"ev": "end",    "pid", "entity", "rid"}                  the app finished producing its body

Endpoints (every amount is a decimal string in the budget's unit):

    /health                               readiness probe (exclude it from metering)
    /complete?cost=X&status=S&sleep=T     charges X (if given), sleeps T, answers S (default 200)
    /stream?chunks=N&delay=S&cost=X&lead=L
                                          a StreamingResponse of N chunks that charges X before
                                          each chunk (if given), sleeps S between chunks and L
                                          before the first one
    /raise?cost=X                         charges X (if given), then raises RuntimeError
    /header?cost=X                        reports X through the ``x-budget-charge`` response header
    /usage?rule=R&entity=E                the ledger's usage of that budget as JSON (exclude it)
    /truth                                this process's ground truth as JSON (exclude it)
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from budget_middleware import (
    BudgetConfig,
    BudgetMiddleware,
    ConfigError,
    RedisLedger,
    get_reservation,
    to_micros,
)
from budget_middleware.budgets import Budget
from budget_middleware.identity import EntityHasher

TRUTH_ENV = "BUDGET_TEST_TRUTH"
ENTITY_HEADER = "x-user"

try:
    _config = BudgetConfig.from_env()
except ConfigError:  # the middleware reports it: the server must stop at start, with one line
    _config = BudgetConfig()
_hasher = EntityHasher(_config.secret)
_records: list[dict[str, Any]] = []
_lock = threading.Lock()
_ledger: RedisLedger | None = None


def _record(request: Request, ev: str, **fields: Any) -> None:
    """Append one ground-truth line (synchronous: nothing can interrupt it halfway)."""
    budget = get_reservation(request)
    row = {
        "ev": ev,
        "pid": os.getpid(),
        "entity": request.headers.get(ENTITY_HEADER, ""),
        "rid": budget.reservation_id,
        **fields,
    }
    with _lock:
        _records.append(row)
        path = os.environ.get(TRUTH_ENV)
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(row) + "\n").encode())
            finally:
                os.close(fd)


def _start(request: Request) -> None:
    budget = get_reservation(request)
    est = to_micros(budget.estimate) if budget.metered else 0
    _record(request, "start", est=est, path=request.url.path, metered=budget.metered)


def _charge(request: Request, cost: str) -> None:
    """Report ``cost`` to the middleware, then (only if it was accepted) to the ground truth."""
    get_reservation(request).charge(cost)
    _record(request, "charge", amount=to_micros(cost))


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def complete(request: Request) -> Response:
    _start(request)
    cost = request.query_params.get("cost")
    if cost is not None:
        _charge(request, cost)
    pause = float(request.query_params.get("sleep", "0"))
    if pause:
        await anyio.sleep(pause)
    _record(request, "end")
    return PlainTextResponse("done", status_code=int(request.query_params.get("status", "200")))


async def stream(request: Request) -> Response:
    _start(request)
    chunks = int(request.query_params.get("chunks", "5"))
    delay = float(request.query_params.get("delay", "0"))
    lead = float(request.query_params.get("lead", "0"))
    cost = request.query_params.get("cost")

    async def body() -> Any:
        if lead:
            await anyio.sleep(lead)
        for i in range(chunks):
            if cost is not None:
                _charge(request, cost)
            yield f"chunk {i}\n".encode()
            if delay:
                await anyio.sleep(delay)
        _record(request, "end")

    return StreamingResponse(body(), media_type="text/plain")


async def raise_(request: Request) -> Response:
    _start(request)
    cost = request.query_params.get("cost")
    if cost is not None:
        _charge(request, cost)
    raise RuntimeError("the app failed on purpose")


async def header(request: Request) -> Response:
    _start(request)
    cost = request.query_params["cost"]
    _record(request, "charge", amount=to_micros(cost))
    _record(request, "end")
    return PlainTextResponse("reported by header", headers={_config.charge_header: cost})


async def usage(request: Request) -> Response:
    global _ledger
    if _ledger is None:
        assert _config.redis_url, "BUDGET_REDIS_URL is not set"
        _ledger = RedisLedger(_config.redis_url, prefix=_config.prefix)
    rule_name = request.query_params.get("rule", "default")
    rule = next(r for r in _config.rules if r.name == rule_name)
    entity = request.query_params["entity"]
    budget = Budget(rule.name, _hasher.token(entity, secret=rule.secret), rule.period_ms)
    found = await _ledger.usage(budget, rule.limit_micros)
    return JSONResponse(
        {
            "limit": found.limit,
            "spent": found.spent,
            "held": found.held,
            "holds": found.holds,
            "remaining": found.remaining,
        }
    )


async def truth(request: Request) -> Response:
    with _lock:
        return JSONResponse(list(_records))


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/complete", complete),
        Route("/stream", stream),
        Route("/raise", raise_),
        Route("/header", header),
        Route("/usage", usage),
        Route("/truth", truth),
    ],
    middleware=[Middleware(BudgetMiddleware)],
)
