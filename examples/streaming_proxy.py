"""A streaming, LLM-style endpoint that charges per chunk.

    uvicorn examples.streaming_proxy:app
    curl -N -H 'x-end-user-id: alice' 'localhost:8000/stream?chunks=20'

Close curl half-way: the request settles as `disconnected`, charged for the chunks it produced.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from budget_middleware import BudgetMiddleware, get_reservation

os.environ.setdefault("BUDGET_KEY", "header:x-end-user-id")
os.environ.setdefault("BUDGET_LIMIT", "2.00")
os.environ.setdefault("BUDGET_ESTIMATE", "0.50")
os.environ.setdefault("BUDGET_LEASE", "30s")

PRICE_PER_CHUNK = Decimal("0.01")


async def stream(request: Request) -> StreamingResponse:
    chunks = min(int(request.query_params.get("chunks", "10")), 50)
    budget = get_reservation(request)

    async def tokens() -> AsyncIterator[bytes]:
        for i in range(chunks):
            budget.charge(PRICE_PER_CHUNK)  # charged as produced: a disconnect keeps what was used
            yield f"data: token {i}\n\n".encode()
            await anyio.sleep(0.1)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(tokens(), media_type="text/event-stream")


app = Starlette(routes=[Route("/stream", stream)], middleware=[Middleware(BudgetMiddleware)])
