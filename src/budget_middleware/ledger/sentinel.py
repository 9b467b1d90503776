"""The Redis ledger behind Redis Sentinel: ``redis+sentinel://host:port[,host:port]/<service>``.

The client asks the Sentinels for the service's primary before every new connection, so after a
failover it reaches the new primary by itself; a connection still open to a demoted primary fails
with a ``READONLY`` reply, which redis-py turns into a reconnect. While no primary is reachable the
ledger raises ``LedgerUnavailable`` (and the middleware applies its fail mode).
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .redis import RedisLedger
from .urls import parse_sentinel_url, redact_url

__all__ = ["RedisSentinelLedger"]


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection instead of failing (as the
    standalone ledger's ``BlockingConnectionPool`` does)."""


class RedisSentinelLedger(RedisLedger):
    """A ledger on the primary that Redis Sentinel names for a service.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[?db=N]``: the
    ``host:port`` pairs are Sentinels (default port 26379). Credentials in the authority, or
    ``username``/``password`` parameters, are for the Redis primary; ``sentinel_auth=true`` sends
    the same credentials to the Sentinels, or pass ``sentinel_username``/``sentinel_password``;
    ``ssl=true`` for TLS to the primary.

    Everything else is the standalone ledger: one atomic script per operation on all the budgets of
    a request. Writes acknowledged by a primary that dies before replicating them are lost with it;
    ``wait_replicas`` narrows that window, and a settle that finds its state gone is ``recovered``.
    """

    def __init__(
        self,
        url: str,
        *,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        **options: Any,
    ) -> None:
        sentinel_url = parse_sentinel_url(url)
        parsed = sentinel_url.nodes
        self.service = sentinel_url.service
        self._sentinels = parsed.hosts
        self._db = sentinel_url.db
        self._options = parsed.connection_options()
        self._sentinel_options: dict[str, Any] = {}
        if parsed.flag("sentinel_auth"):
            self._sentinel_options.update(
                {k: v for k, v in self._options.items() if k in ("username", "password")}
            )
        if sentinel_username is not None:
            self._sentinel_options["username"] = sentinel_username
        if sentinel_password is not None:
            self._sentinel_options["password"] = sentinel_password
        self._sentinel: Sentinel | None = None
        super().__init__(url, **options)

    def __repr__(self) -> str:
        return f"RedisSentinelLedger({redact_url(self.url or '')!r})"

    def _connect(self) -> aioredis.Redis:
        timeouts = {
            "socket_timeout": self._socket_timeout,
            "socket_connect_timeout": self._socket_timeout,
        }
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(self._sentinels),
            # No retries against one Sentinel (redis-py's default client retries ten times with
            # backoff, seconds per Sentinel that is down): asking the next Sentinel is the retry.
            sentinel_kwargs={
                **timeouts,
                "decode_responses": True,
                "retry": Retry(NoBackoff(), 0),
                **self._sentinel_options,
            },
        )
        client: aioredis.Redis = self._sentinel.master_for(
            self.service,
            redis_class=aioredis.Redis,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=self.max_connections,
            timeout=self._socket_timeout,
            decode_responses=True,
            health_check_interval=30,
            db=self._db,
            # As the standalone client: a connection to a primary that went away fails once,
            # and the batch is sent again on a fresh connection to whichever primary the
            # Sentinels name now (every script is idempotent). Not redis-py's default of three
            # retries with backoff, which could hold a batch for several socket timeouts.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[rexc.ConnectionError],
            **timeouts,
            **self._options,
        )
        return client

    async def aclose(self) -> None:
        sentinel, self._sentinel = self._sentinel, None
        try:
            await super().aclose()
        finally:
            # Each Sentinel's client, one by one (``Sentinel.aclose`` came with redis-py 7).
            for client in sentinel.sentinels if sentinel is not None else ():
                with contextlib.suppress(rexc.RedisError, OSError, RuntimeError):
                    await client.aclose()
