"""The naive reserve-then-release middleware, the way the large public gateway did it.

Pure ASGI, redis.asyncio, every command awaited: on entry ``INCRBYFLOAT spend:<user> estimate``
and ``EXPIRE spend:<user> 60``, 429 when the new value is over the limit; on exit, in ``finally``,
``INCRBYFLOAT spend:<user> -(estimate - actual)``, the actual cost read from the response's
``x-budget-charge`` header. Dollars as floats, no holds, no leases, no exactly-once.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .common import (
    CHARGE_HEADER,
    ESTIMATE,
    HEADER,
    LIMIT,
    REDIS_URL,
    RTT_PATH,
    build_app,
    count_round_trips,
)


class NaiveReserveRelease:
    def __init__(
        self,
        app: ASGIApp,
        *,
        redis_url: str,
        header: str = HEADER,
        estimate: float = float(ESTIMATE),
        limit: float = float(LIMIT),
        ttl_s: int = 60,
        exclude: tuple[str, ...] = (RTT_PATH,),
        max_connections: int = 1024,
    ) -> None:
        self.app = app
        # redis-py 8's default asyncio pool raises past 100 connections; at 128 concurrent
        # requests each awaiting a command that failed requests, so the pool is made larger.
        client = aioredis.Redis.from_url(redis_url, max_connections=max_connections)
        self.redis: Any = count_round_trips(client)
        self.header = header.encode()
        self.charge_header = CHARGE_HEADER.encode()
        self.estimate = estimate
        self.limit = limit
        self.ttl_s = ttl_s
        self.exclude = exclude

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exclude:
            await self.app(scope, receive, send)
            return
        user = next((v for k, v in scope["headers"] if k == self.header), None)
        if user is None:
            await self.app(scope, receive, send)
            return
        key = f"spend:{user.decode('latin-1')}"
        spent = await self.redis.incrbyfloat(key, self.estimate)
        await self.redis.expire(key, self.ttl_s)
        if spent > self.limit:
            await self.redis.incrbyfloat(key, -self.estimate)
            await send({"type": "http.response.start", "status": 429, "headers": []})
            await send({"type": "http.response.body", "body": b"budget exceeded"})
            return
        actual = self.estimate

        async def send_reading_cost(message: Message) -> None:
            nonlocal actual
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == self.charge_header:
                        actual = float(value)
            await send(message)

        try:
            await self.app(scope, receive, send_reading_cost)
        finally:
            await self.redis.incrbyfloat(key, -(self.estimate - actual))


app = build_app()
app.add_middleware(NaiveReserveRelease, redis_url=REDIS_URL)
