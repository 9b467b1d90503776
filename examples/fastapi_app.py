"""FastAPI: an OpenAI-style endpoint with per-user and per-key budgets and a cost estimator.

    uvicorn examples.fastapi_app:app
    curl -i -H 'authorization: Bearer sk-demo' -H 'x-end-user-id: 347727' \
         -H 'content-type: application/json' -d '{"max_tokens": 200, "prompt": "hi"}' \
         localhost:8000/v1/completions
"""

from __future__ import annotations

import json
import os
from decimal import Decimal

from fastapi import FastAPI, Request
from pydantic import BaseModel

from budget_middleware import BudgetMiddleware, get_reservation

os.environ.setdefault(
    "BUDGET_RULES",
    json.dumps(
        [
            {"name": "user-daily", "key": "header:x-end-user-id", "limit": "50", "period": "1d"},
            {"name": "key-monthly", "key": "bearer", "limit": "500", "period": "30d"},
        ]
    ),
)
os.environ.setdefault("BUDGET_ERROR_FORMAT", "openai")
os.environ.setdefault("BUDGET_MAX_HOLD", "5")

PRICE_PER_TOKEN = Decimal("0.00002")


async def estimate(request: Request) -> Decimal:
    """Worst case: every requested output token (default 1000) plus the prompt."""
    body = await request.json() if await request.body() else {}
    max_tokens = int(body.get("max_tokens") or 1000)
    prompt_tokens = len(str(body.get("prompt", ""))) // 4 + 1
    return (max_tokens + prompt_tokens) * PRICE_PER_TOKEN


class Completion(BaseModel):
    prompt: str = ""
    max_tokens: int = 1000


app = FastAPI()
app.add_middleware(BudgetMiddleware, estimate=estimate)


@app.post("/v1/completions")
async def completions(body: Completion, request: Request) -> dict[str, object]:
    used = min(body.max_tokens, 42)  # what the "model" really produced
    get_reservation(request).charge((used + len(body.prompt) // 4 + 1) * PRICE_PER_TOKEN)
    return {"choices": [{"text": "hello " * 3}], "usage": {"completion_tokens": used}}
