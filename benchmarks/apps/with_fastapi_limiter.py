"""fastapi-limiter 0.2 (pyrate-limiter 4) with Redis: ``Depends(RateLimiter(limiter=...))``.

fastapi-limiter 0.2 takes any ``pyrate_limiter.Limiter``. A ``Limiter(RedisBucket)`` is one sorted
set for every key (one global limit), so per-user limits need a bucket factory that makes a
``RedisBucket`` per key, as pyrate-limiter's README shows for per-name routing. The limit is huge
and per day; the bucket is pyrate-limiter's default sliding-window log (one sorted-set member
per request, a ``ZCOUNT`` + ``ZADD`` script per check), leaked in the background.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import AbstractBucket, BucketFactory, Duration, Limiter, Rate, RateItem
from pyrate_limiter.buckets.redis_bucket import LuaScript, RedisBucket

from .common import HEADER, LIMIT, REDIS_URL, build_app, count_round_trips

redis_client: Any = count_round_trips(aioredis.Redis.from_url(REDIS_URL))
RATES = [Rate(int(LIMIT), Duration.DAY)]
SCRIPT_SHA = hashlib.sha1(LuaScript.PUT_ITEM.encode()).hexdigest()  # what SCRIPT LOAD answers


class PerKeyRedisFactory(BucketFactory):
    """A ``RedisBucket`` per key, made on first use (``create`` also schedules its leak)."""

    def __init__(self) -> None:
        self.buckets: dict[str, AbstractBucket] = {}

    def wrap_item(self, name: str, weight: int = 1) -> RateItem:
        return RateItem(name, time.time_ns() // 1_000_000, weight=weight)

    def get(self, item: RateItem) -> AbstractBucket:
        bucket = self.buckets.get(item.name)
        if bucket is None:
            bucket = self.create(
                RedisBucket, RATES, redis_client, f"fastapi-limiter:{item.name}", SCRIPT_SHA
            )
            self.buckets[item.name] = bucket
        return bucket


async def by_user(request: Request) -> str:
    return request.headers.get(HEADER, "anonymous")


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    sha = await redis_client.script_load(LuaScript.PUT_ITEM)
    if sha != SCRIPT_SHA:
        raise RuntimeError(f"script sha {sha!r} != {SCRIPT_SHA!r}")
    yield
    await redis_client.aclose()


rate_limiter = RateLimiter(limiter=Limiter(PerKeyRedisFactory()), identifier=by_user)
app = build_app(dependencies=[Depends(rate_limiter)], lifespan=lifespan)
