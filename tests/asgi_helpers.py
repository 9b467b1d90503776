"""Hand-written ASGI drivers for the middleware tests.

``httpx.ASGITransport`` buffers the whole response and cannot disconnect mid-stream, so these tests
drive the middleware with a scripted ``receive`` (the request body, then a block until the test says
the client left) and a recording ``send`` (that can be told to fail as a gone client's would).
Every wait here has a deadline; the only sleeps are tiny polls inside deadline loops.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_state
from starlette.types import Message

import budget_middleware.finalizer as finalizer_module
import budget_middleware.reserving as reserving_module
from budget_middleware import Finalizer, Settled, Settlement, telemetry

__all__ = [
    "DEADLINE_S",
    "LedgerProxy",
    "MessageQueue",
    "RecordingSend",
    "ScriptedReceive",
    "SettlementLog",
    "http_scope",
    "settle_all",
    "wait_until",
    "without_telemetry_sdk",
]

DEADLINE_S = 5.0
POLL_S = 0.002


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str] | tuple[bytes, bytes]] = (),
    query_string: bytes = b"",
    root_path: str = "",
    spec_version: str = "2.4",
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An HTTP scope as a server would build it (``path`` includes ``root_path``)."""
    raw = [
        (
            k.encode("latin-1") if isinstance(k, str) else k,
            v.encode("latin-1") if isinstance(v, str) else v,
        )
        for k, v in headers
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query_string,
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "extensions": extensions if extensions is not None else {},
    }


class ScriptedReceive:
    """``receive``: the request body (one message per chunk), then blocks until ``disconnect()``.

    After the disconnect every call returns ``http.disconnect``, as servers do.
    """

    def __init__(self, *chunks: bytes) -> None:
        parts = list(chunks) or [b""]
        self._body: deque[Message] = deque(
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
            for i, part in enumerate(parts)
        )
        self._gone = anyio.Event()
        self.calls = 0
        self.disconnects_delivered = 0

    def disconnect(self) -> None:
        """The client leaves: a pending or later ``receive()`` returns ``http.disconnect``."""
        self._gone.set()

    async def __call__(self) -> Message:
        self.calls += 1
        if self._body:
            return self._body.popleft()
        await self._gone.wait()
        self.disconnects_delivered += 1
        return {"type": "http.disconnect"}


class MessageQueue:
    """``receive`` fed by the test: ``push(message)``; each call returns the next message.

    ``on_deliver`` (optional) runs synchronously as each message is handed out.
    """

    def __init__(self, on_deliver: Callable[[Message], None] | None = None) -> None:
        self._send, self._recv = anyio.create_memory_object_stream[Message](16)
        self._on_deliver = on_deliver

    def push(self, message: Message) -> None:
        self._send.send_nowait(message)

    async def __call__(self) -> Message:
        message = await self._recv.receive()
        if self._on_deliver is not None:
            self._on_deliver(message)
        return message

    def close(self) -> None:
        self._send.close()
        self._recv.close()


class RecordingSend:
    """``send`` that records every message; with ``fail_after=N`` it raises ``OSError`` from the
    (N+1)th message on, as a server does for a client that is gone (ASGI spec 2.4).

    ``on_message`` (optional, sync) runs as each message is recorded.
    """

    def __init__(
        self,
        *,
        fail_after: int | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self.refused: list[Message] = []
        self.fail_after = fail_after
        self._on_message = on_message
        self._changed = anyio.Event()

    async def __call__(self, message: Message) -> None:
        if self.fail_after is not None and len(self.messages) >= self.fail_after:
            self.refused.append(message)
            raise OSError("the client is gone")
        self.messages.append(message)
        if self._on_message is not None:
            self._on_message(message)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, kind: str, timeout_s: float = DEADLINE_S) -> Message:
        """The first recorded message of type ``kind``, waiting for it up to ``timeout_s``."""
        with anyio.fail_after(timeout_s):
            while True:
                for message in self.messages:
                    if message["type"] == kind:
                        return message
                await self._changed.wait()

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {self.types()}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(k), bytes(v)) for k, v in self.start.get("headers", ())]

    def header(self, name: str) -> str | None:
        """The one value of header ``name`` (case-insensitive), or None; fails if repeated."""
        values = self.header_values(name)
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {values}"
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.raw_headers if k.lower() == key]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return [
            (bytes(k), bytes(v))
            for m in self.messages
            if m["type"] == "http.response.trailers"
            for k, v in m.get("headers", ())
        ]


class SettlementLog:
    """An ``on_settled`` hook that records every settlement a finalizer applied."""

    def __init__(self) -> None:
        self.entries: list[tuple[Settlement, Settled]] = []

    def __call__(self, settlement: Settlement, settled: Settled) -> None:
        self.entries.append((settlement, settled))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def reasons(self) -> list[str]:
        return [s.reason for s, _ in self.entries]

    @property
    def actuals(self) -> list[int]:
        return [s.actual for s, _ in self.entries]

    @property
    def outcomes(self) -> list[str]:
        return [r.outcome for _, r in self.entries]

    def only(self) -> tuple[Settlement, Settled]:
        assert len(self.entries) == 1, f"expected exactly one settlement, got {self.entries}"
        return self.entries[0]


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = DEADLINE_S,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await anyio.sleep(POLL_S)


async def settle_all(finalizer: Finalizer, timeout_s: float = DEADLINE_S) -> None:
    """Wait until the finalizer has applied everything submitted to it.

    Polls ``pending`` (queued plus the batch in flight) rather than trusting ``wait_idle`` alone,
    so the helper stays correct whichever way the worker and the waiter interleave.
    """
    await wait_until(lambda: finalizer.pending == 0, timeout_s=timeout_s, what="the finalizer")


class LedgerProxy:
    """A real ledger behind hooks a test controls: gate settlements, fail renewals, lose replies.

    It has no ``settle_now``, so every settlement goes through the finalizer's worker, as it does
    on Redis, whatever the backend behind it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.settle_gate: anyio.Event | None = None  # settle_many waits for it when set
        self.extend_error: BaseException | None = None  # extend raises it when set
        self.lose_reserve_reply = False  # reserve runs, then never answers
        self.reserved = anyio.Event()
        self.extend_calls = 0
        self.settle_batches = 0

    async def reserve(self, reservation_id: str, holds: Any, lease_ms: int) -> Any:
        result = await self.inner.reserve(reservation_id, holds, lease_ms)
        self.reserved.set()
        if self.lose_reserve_reply:
            await anyio.sleep_forever()
        return result

    async def settle(self, settlement: Settlement) -> Settled:
        (result,) = await self.settle_many([settlement])
        return result

    async def settle_many(self, settlements: Any) -> list[Settled]:
        if self.settle_gate is not None:
            await self.settle_gate.wait()
        self.settle_batches += 1
        result: list[Settled] = await self.inner.settle_many(settlements)
        return result

    async def extend(self, reservations: Any, lease_ms: int) -> Any:
        self.extend_calls += 1
        if self.extend_error is not None:
            raise self.extend_error
        return await self.inner.extend(reservations, lease_ms)

    async def usage(self, budget: Any, limit: int) -> Any:
        return await self.inner.usage(budget, limit)

    async def set_limit(self, budget: Any, limit: int | None) -> None:
        await self.inner.set_limit(budget, limit)

    async def reset(self, budget: Any) -> None:
        await self.inner.reset(budget)

    async def aclose(self) -> None:
        await self.inner.aclose()


def without_telemetry_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracer provider and no meter provider, whatever other tests installed; the package's
    instruments made from the API's proxy meter, as in a process without an SDK."""
    proxy_tracer = trace.ProxyTracer("budget_middleware", "0.1.0")
    for module in (telemetry, reserving_module, finalizer_module):
        monkeypatch.setattr(module, "tracer", proxy_tracer)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(metrics_state, "_METER_PROVIDER", None)
    proxy = metrics_state._ProxyMeter("budget_middleware", "0.1.0")
    monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(proxy))
