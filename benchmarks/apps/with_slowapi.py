"""slowapi with its Redis storage (the ``limits`` library's sync RedisStorage, fixed window).

The limit is on the endpoint (``@limiter.limit``), keyed by the ``x-user`` header, and huge. The
storage's client is sync: every check blocks the event loop for one Redis round trip, which is
what slowapi users get.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded

from .common import HEADER, LIMIT, REDIS_URL, build_app, count_round_trips, endpoint


def by_user(request: Request) -> str:
    return request.headers.get(HEADER, "anonymous")


limiter = Limiter(key_func=by_user, storage_uri=REDIS_URL)
# limits' RedisStorage keeps its redis.Redis client in .storage (no public way to inject one).
count_round_trips(limiter._storage.storage)

app = build_app(route=limiter.limit(f"{LIMIT}/day")(endpoint))
app.state.limiter = limiter
handler: Any = _rate_limit_exceeded_handler
app.add_exception_handler(RateLimitExceeded, handler)
