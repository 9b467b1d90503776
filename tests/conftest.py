"""Shared fixtures.

Sections:
  1. Real redis-server: one per session (``redis_server``), flushed per test (``redis_url``).
  2. Ledger backends: ``make_ledger`` (a factory, for a per-test horizon) and ``ledger`` (its
     default product), parametrised over ``memory``, ``fakeredis`` and ``redis``.

Add new fixtures in a section of their own rather than inside these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest

from budget_middleware.ledger import MemoryLedger, RedisLedger
from redis_server import RedisServer

DAY_MS = 86_400_000
FAKE_POOL_SIZE = 1_000

# =================================================================================================
# 1. Real redis-server
# =================================================================================================


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free port for the whole session (skipped, or failed on CI,
    when the binary is missing)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, with every key flushed before the test."""
    redis_server.flushall()
    return redis_server.url


# =================================================================================================
# 2. Ledger backends
# =================================================================================================

BACKENDS = [
    pytest.param("memory", marks=pytest.mark.memory, id="memory"),
    pytest.param("fakeredis", marks=pytest.mark.fakeredis, id="fakeredis"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
]


class LedgerFactory:
    """Makes ledgers of one backend for one test, and closes them all at teardown.

    ``await make_ledger(horizon_ms=...)`` returns a ledger; ledgers made by one factory share the
    store (one fake server, one real server) except on ``memory``, where each is its own store.
    """

    def __init__(self, backend: str, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self._request = request
        self._ledgers: list[Any] = []
        self._fake_clients: list[Any] = []
        self._fake_server: Any = None
        self._url: str | None = None

    @property
    def is_redis(self) -> bool:
        """True for the two backends that run the Lua scripts (fakeredis and real Redis)."""
        return self.backend != "memory"

    async def __call__(self, *, horizon_ms: int = DAY_MS) -> Any:
        ledger: Any
        if self.backend == "memory":
            ledger = MemoryLedger(horizon_ms=horizon_ms)
        elif self.backend == "fakeredis":
            if self._fake_server is None:
                self._fake_server = fakeredis.FakeServer()
            # A client the test owns: its pool is sized for the 200-task concurrency test (the
            # default pool of redis-py's asyncio client refuses a 101st concurrent connection).
            client = fakeredis.FakeAsyncRedis(
                server=self._fake_server, decode_responses=True, max_connections=FAKE_POOL_SIZE
            )
            self._fake_clients.append(client)
            ledger = RedisLedger(client=client, horizon_ms=horizon_ms)
        elif self.backend == "redis":
            if self._url is None:
                self._url = self._request.getfixturevalue("redis_url")  # flushes the server
            ledger = RedisLedger(self._url, horizon_ms=horizon_ms)
        else:  # pragma: no cover - a typo in BACKENDS
            raise AssertionError(f"unknown backend {self.backend!r}")
        self._ledgers.append(ledger)
        return ledger

    async def wipe(self, ledger: Any) -> Any:
        """Lose the ledger's state, as a Redis restarted without persistence would.

        Returns the ledger to use afterwards: the same one on Redis (after FLUSHALL), a fresh
        ``MemoryLedger`` with the same horizon on memory (a restarted process).
        """
        if self.backend == "memory":
            fresh = MemoryLedger(horizon_ms=ledger.horizon_ms)
            self._ledgers.append(fresh)
            return fresh
        await ledger.client().flushall()
        return ledger

    async def aclose(self) -> None:
        for ledger in self._ledgers:
            await ledger.aclose()
        for client in self._fake_clients:
            await client.aclose()
        self._ledgers.clear()
        self._fake_clients.clear()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name: ``memory``, ``fakeredis`` or ``redis``."""
    return str(request.param)


@pytest.fixture
async def make_ledger(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[LedgerFactory]:
    """A factory of ledgers of the current backend; every ledger it made is closed at teardown."""
    factory = LedgerFactory(backend, request)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def ledger(make_ledger: LedgerFactory) -> Any:
    """A ledger of the current backend with the default 24 h tombstone horizon."""
    return await make_ledger()
