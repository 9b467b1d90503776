"""The client driver of a chaos run: asyncio + httpx, plus raw sockets for streams it abandons.

``LoadDriver`` sends ``requests`` requests over ``duration_s`` seconds (paced evenly, so the faults
meet a steady load; bounded in count and time) from ``concurrency`` workers, each to the next replica
that is up, of a kind drawn from ``mix``:

Short requests go over raw sockets (``Connection: close``), streams through httpx.

    complete  /complete, charges a random amount (or reports nothing: the estimate), short sleep
    header    /header, the cost in the response header
    stream    /stream, read to the end
    abandon   /stream over a raw socket, closed after a few chunks (a client that leaves)
    slow      /stream longer than the lease (kept alive by renewals)
    raise     /raise, the app raises (after charging, or not)
    tight     /complete on ``tight-a``, whose second rule (``tight``) has a small limit: it runs at
              its limit, with 429s when live holds fill it
    broke     /complete charging the whole estimate on ``broke`` (same small rule): spent after a
              few requests, then 429 every time

The load goes on at the same rate past ``duration_s`` until ``release`` is set (the harness sets it
once its faults are over), within ``max_requests`` and ``max_duration_s``.

Every request is a ``Call`` with its replica, the replica's pid, send and end times (seconds since
the run's origin) and an outcome: ``ok``, ``abandoned``, ``raised`` (a 500 from /raise), ``429``,
``503``, ``refused`` (connection refused: the replica went away), ``cut`` (the connection died
mid-response), ``timeout``, or ``unexpected-<status>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from budget_middleware import format_micros

from .procs import Replica

__all__ = [
    "DEFAULT_MIX",
    "ENTITY_HEADER",
    "EST",
    "SLOW_KINDS",
    "TIGHT_HEADER",
    "Call",
    "LoadDriver",
    "RawStream",
]

ENTITY_HEADER = "x-user"
TIGHT_HEADER = "x-tight"
EST = 1_000_000  # BUDGET_ESTIMATE=1: every charge stays within it, so nothing overruns
HTTP_TIMEOUT_S = 15.0
STREAM_KINDS = frozenset({"stream", "abandon", "slow"})
SLOW_KINDS = frozenset({"slow"})  # read to their end, longer than the lease

# httpcore looks for sniffio on every request; when it is not installed each look is a failed
# import that walks sys.path again (about 0.7 ms a request here). Remember that it is missing.
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

DEFAULT_MIX: dict[str, float] = {
    "complete": 0.26,
    "header": 0.07,
    "stream": 0.16,
    "abandon": 0.10,
    "slow": 0.06,
    "raise": 0.08,
    "tight": 0.20,
    "broke": 0.07,
}


@dataclass(eq=False, slots=True)
class Call:
    kind: str
    replica: int
    pid: int
    entity: str
    t0: float
    t1: float = -1.0
    outcome: str = ""

    @property
    def done(self) -> bool:
        return self.t1 >= 0


class RawStream:
    """A GET over a raw socket, so the caller decides when the connection dies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.data = b""

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str]) -> RawStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return cls(reader, writer)

    @property
    def status(self) -> int | None:
        """The response's status, once its status line has arrived."""
        head, sep, _ = self.data.partition(b"\r\n")
        if not sep:
            return None
        return int(head.split()[1])

    def seen(self, chunk: int) -> bool:
        return f"chunk {chunk}\n".encode() in self.data

    async def read_until_chunk(self, chunk: int, timeout_s: float = HTTP_TIMEOUT_S) -> bool:
        """Read until body chunk ``chunk`` arrived (True) or the response is not a 200 or the
        connection ended (False)."""
        async with asyncio.timeout(timeout_s):
            while not self.seen(chunk):
                if self.status not in (None, 200):
                    return False
                more = await self.reader.read(65536)
                if not more:
                    return False
                self.data += more
        return True

    async def read_to_eof(self, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while more := await self.reader.read(65536):
                self.data += more

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def classify(kind: str, status: int) -> str:
    if status == 200:
        return "ok"
    if status in (429, 503):
        return str(status)
    if status == 500 and kind == "raise":
        return "raised"
    return f"unexpected-{status}"


class LoadDriver:
    """Sends the mixed load; see the module docstring. ``origin`` is the run's clock origin
    (``time.monotonic()``); ``sleep_scale`` scales the apps' sleeps and the short streams' delays."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        origin: float,
        requests: int,
        duration_s: float,
        concurrency: int,
        lease_s: float,
        entities: Sequence[str],
        mix: dict[str, float] | None = None,
        seed: int = 1,
        sleep_scale: float = 1.0,
        max_requests: int | None = None,
        max_duration_s: float | None = None,
    ) -> None:
        self.replicas = list(replicas)
        self.origin = origin
        self.requests = requests
        self.duration_s = duration_s
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.entities = list(entities)
        mix = mix or DEFAULT_MIX
        self.kinds = list(mix)
        self.weights = [mix[k] for k in self.kinds]
        self.rng = random.Random(seed)
        self.sleep_scale = sleep_scale
        self.calls: list[Call] = []
        self.inflight: dict[int, set[Call]] = {r.index: set() for r in self.replicas}
        self.issued = 0
        # The load goes on past ``duration_s`` (at the same rate) until ``release`` is set (the
        # faults are over), within hard bounds on count and time.
        self.release = asyncio.Event()
        self.max_requests = max_requests or 2 * requests
        self.max_duration_s = max_duration_s or duration_s + 60
        self._next_replica = 0
        self._clients: dict[str, httpx.AsyncClient] = {}

    # -- the clock and what the faults ask -------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.origin

    def count(self, outcome: str, *, since: float = 0.0, replica: int | None = None) -> int:
        """Calls that ended with ``outcome`` at ``since`` or later (on ``replica``)."""
        n = 0
        for c in reversed(self.calls):  # in order of sending; none runs longer than its timeout
            if c.t0 < since - HTTP_TIMEOUT_S - 1:
                break
            if c.outcome == outcome and c.t1 >= since and (replica is None or c.replica == replica):
                n += 1
        return n

    def streams_in_flight(self, replica: int, kinds: frozenset[str] = STREAM_KINDS) -> int:
        return sum(1 for c in self.inflight[replica] if c.kind in kinds)

    def outcomes(self) -> Counter[str]:
        return Counter(c.outcome for c in self.calls)

    def by_kind(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = {}
        for c in self.calls:
            table.setdefault(c.kind, Counter())[c.outcome] += 1
        return table

    # -- the load --------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))
        finally:
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                await client.aclose()

    def _client(self, replica: Replica) -> httpx.AsyncClient:
        """A client per replica process (its URL): a pool scan per request stays short, and the
        connections to a replica that died are left with its client."""
        client = self._clients.get(replica.url)
        if client is None:
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency // 2
            )
            timeout = httpx.Timeout(HTTP_TIMEOUT_S, pool=None)
            client = httpx.AsyncClient(base_url=replica.url, timeout=timeout, limits=limits)
            self._clients[replica.url] = client
        return client

    async def _worker(self) -> None:
        while True:
            n, now = self.issued, self.now()
            if n >= self.max_requests or now >= self.max_duration_s:
                return
            if (n >= self.requests or now >= self.duration_s) and self.release.is_set():
                return
            self.issued += 1
            # Pacing: request n is sent no earlier than n/rate into the run (a rate limit).
            ahead = n * self.duration_s / self.requests - self.now()
            if ahead > 0:
                await asyncio.sleep(ahead)
            replica = await self._pick()
            if replica is None:
                return
            await self._one(self.rng.choices(self.kinds, self.weights)[0], replica)

    async def _pick(self) -> Replica | None:
        """The next replica that is up (round robin); waits while none is, until the run's end."""
        while self.now() < self.max_duration_s:
            up = [r for r in self.replicas if r.up]
            if up:
                self._next_replica += 1
                return up[self._next_replica % len(up)]
            await asyncio.sleep(0.01)
        return None

    async def _one(self, kind: str, replica: Replica) -> None:
        entity = {"tight": "tight-a", "broke": "broke"}.get(kind) or self.rng.choice(self.entities)
        call = Call(kind, replica.index, replica.pid, entity, self.now())
        self.calls.append(call)
        inflight = self.inflight[replica.index]
        inflight.add(call)
        try:
            call.outcome = await self._send(call, replica)
        except httpx.ConnectError:
            call.outcome = "refused"
        except ConnectionRefusedError:
            call.outcome = "refused"
        except httpx.TimeoutException:
            call.outcome = "timeout"
        except TimeoutError:
            call.outcome = "timeout"
        except (httpx.TransportError, ConnectionError, OSError):
            call.outcome = "cut"
        finally:
            call.t1 = self.now()
            inflight.discard(call)

    def _amount(self, most: int) -> str:
        return format_micros(self.rng.randint(1, most))

    def _maybe_cost(self, most: int, none_share: float) -> dict[str, str]:
        return {} if self.rng.random() < none_share else {"cost": self._amount(most)}

    async def _send(self, call: Call, replica: Replica) -> str:
        rng, scale, kind = self.rng, self.sleep_scale, call.kind
        headers = {ENTITY_HEADER: call.entity}
        params: dict[str, Any]
        if kind in ("tight", "broke"):
            headers[TIGHT_HEADER] = call.entity
            cost = "0.0005" if kind == "tight" else "1"
            params = {"cost": cost, "sleep": f"{0.15 * scale:.3f}" if kind == "tight" else "0"}
            return await self._get(replica, "/complete", params, headers, kind)
        if kind == "complete":
            params = {**self._maybe_cost(EST, 0.25), "sleep": f"{rng.uniform(0, 0.05) * scale:.3f}"}
            return await self._get(replica, "/complete", params, headers, kind)
        if kind == "header":
            return await self._get(replica, "/header", {"cost": self._amount(EST)}, headers, kind)
        if kind == "raise":
            return await self._get(replica, "/raise", self._maybe_cost(EST, 0.5), headers, kind)
        if kind == "stream":
            chunks = rng.randint(3, 8)
            params = {
                "chunks": chunks,
                "delay": f"{rng.uniform(0.005, 0.03) * scale:.3f}",
                **self._maybe_cost(EST // chunks, 0.25),
            }
            return await self._stream(replica, params, headers, chunks)
        if kind == "slow":
            chunks = 6
            length = self.lease_s * rng.uniform(1.3, 2.0)  # longer than the lease
            params = {
                "chunks": chunks,
                "delay": f"{length / chunks:.3f}",
                **self._maybe_cost(EST // chunks, 0.3),
            }
            return await self._stream(replica, params, headers, chunks)
        if kind == "abandon":
            query = urlencode({"chunks": 200, "delay": 0.02, **self._maybe_cost(EST // 200, 0.3)})
            return await self._abandon(replica, f"/stream?{query}", headers, rng.randint(1, 4))
        raise ValueError(f"unknown request kind {kind!r}")

    async def _get(
        self, replica: Replica, path: str, params: dict[str, Any], headers: dict[str, str], kind: str
    ) -> str:
        """A short request over a raw socket (one connection, ``Connection: close``): far less
        client CPU than httpx, which the streams use."""
        stream = await RawStream.open(replica.server.port, f"{path}?{urlencode(params)}", headers)
        try:
            await stream.read_to_eof()
        finally:
            await stream.close()
        status = stream.status
        return "cut" if status is None else classify(kind, status)

    async def _stream(
        self, replica: Replica, params: dict[str, Any], headers: dict[str, str], chunks: int
    ) -> str:
        client = self._client(replica)
        async with client.stream("GET", "/stream", params=params, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return classify("stream", response.status_code)
            body = b"".join([part async for part in response.aiter_bytes()])
        return "ok" if body.count(b"chunk ") == chunks else "cut"

    async def _abandon(self, replica: Replica, path: str, headers: dict[str, str], after: int) -> str:
        stream = await RawStream.open(replica.server.port, path, headers)
        try:
            if await stream.read_until_chunk(after):
                return "abandoned"
            status = stream.status
            return "cut" if status in (None, 200) else classify("abandon", status)
        finally:
            await stream.close()
