"""Quickstart: a Starlette app with a per-user daily budget.

uvicorn examples.quickstart:app                       # memory ledger
BUDGET_REDIS_URL=redis://localhost:6379/0 uvicorn examples.quickstart:app

curl -i -H 'x-end-user-id: alice' 'localhost:8000/work?cost=0.4'
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, get_reservation

# Defaults for the example; any BUDGET_* variable you set wins.
os.environ.setdefault("BUDGET_KEY", "header:x-end-user-id")
os.environ.setdefault("BUDGET_LIMIT", "1.00")
os.environ.setdefault("BUDGET_PERIOD", "1d")
os.environ.setdefault("BUDGET_ESTIMATE", "0.50")
os.environ.setdefault("BUDGET_EXCLUDE", "/health")


async def work(request: Request) -> JSONResponse:
    cost = request.query_params.get("cost", "0.10")
    budget = get_reservation(request)
    budget.charge(cost)  # the actual cost; the middleware settles it when the response ends
    return JSONResponse({"charged": cost, "metered": budget.metered})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/work", work), Route("/health", health)],
    middleware=[Middleware(BudgetMiddleware)],
)
