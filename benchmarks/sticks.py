"""The measuring sticks of ``overhead.py --floor``: what a middleware of this kind costs at the least.

- ``HeaderFloor`` (floor): reads the id header, wraps ``send`` and adds two fixed RateLimit-shaped
  headers. No ledger, no reservation.
- ``LeastBudget`` (least): the least a middleware enforcing the benchmark's budget does per request.

Whatever ``BudgetMiddleware`` spends beyond ``least`` is its price for what ``least`` leaves out
(listed in its docstring).
"""

from __future__ import annotations

import heapq
import random
import time
from typing import Any

HEADER = b"x-user"


class HeaderFloor:
    """The least a pure-ASGI middleware of this kind does, for scale: read the id header, wrap
    ``send`` and add two RateLimit-shaped headers (fixed text). No ledger, no reservation."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = next((v for k, v in scope["headers"] if k == HEADER), b"")
        scope.setdefault("state", {})["user"] = user  # handed on, as a handle would be

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", ()),
                    (b"ratelimit-policy", b'"bench";q=1000000000000;w=86400'),
                    (b"ratelimit", b'"bench";r=999999999990;t=3600'),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _LeastState:
    __slots__ = ("heap", "held", "holds", "spent")

    def __init__(self) -> None:
        self.held = 0
        self.holds: dict[str, tuple[int, int]] = {}
        self.spent: dict[int, int] = {}
        self.heap: list[tuple[int, str]] = []


_plain_micros: dict[str, int] = {}  # the few prices an app reports, parsed once


def to_micros(amount: str, what: str) -> int:
    from budget_middleware import to_micros as parse

    return parse(amount, what=what)


class _LeastHandle:
    __slots__ = ("_headers", "_send", "charged", "closed", "reported", "status")

    def __init__(self, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        self.charged = 0
        self.reported = False
        self.closed = False
        self.status = 0
        self._send: Any = send
        self._headers = headers

    def charge(self, amount: str) -> None:
        micros = _plain_micros.get(amount)
        if micros is None:
            micros = _plain_micros[amount] = to_micros(amount, what="charge")
        if self.closed:
            raise RuntimeError("charged after the settle")
        self.charged += micros
        self.reported = True

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = message.copy()
            message["headers"] = [*message.get("headers", ()), *self._headers]
        await self._send(message)


class LeastBudget:
    """For scale: the least a middleware enforcing this benchmark's budget does per request, with
    none of the package's generality: the id header's budget from a dict, a time-ordered id, a
    hold with a lease (and an expiry heap, as a purge needs) checked against spent + held, the two
    RateLimit headers with the two numbers that change, an in-flight record (as lease renewal
    needs), a handle that takes charges, and the settle in ``finally``. No exclusions, missing ids,
    rejections, telemetry checks, disconnect watching, charge header, trailers, purge or
    finalizer: whatever the package does beyond this is its price for those."""

    LIMIT = 10**15
    PERIOD_MS = 86_400_000
    LEASE_MS = 60_000
    ESTIMATE = 10
    POLICY = (b"ratelimit-policy", b'"bench";q=1000000000000000;w=86400')

    def __init__(self, app: Any) -> None:
        self.app = app
        self.states: dict[bytes, _LeastState] = {}
        self.in_flight: dict[str, tuple[_LeastState, float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = b""
        for name, value in scope["headers"]:
            if len(name) == 6 and name == b"x-user":
                user = value
        st = self.states.get(user)
        if st is None:
            st = self.states[user] = _LeastState()
        now = time.time_ns() // 1_000_000
        rid = (now << 80 | random.getrandbits(80)).to_bytes(16, "big").hex()
        window = now - now % self.PERIOD_MS
        left = self.LIMIT - st.spent.get(window, 0) - st.held
        estimate = self.ESTIMATE
        if left <= 0 or estimate > left:
            raise RuntimeError("the benchmark's budget never runs out")
        expiry = now + self.LEASE_MS
        st.holds[rid] = (expiry, estimate)
        heapq.heappush(st.heap, (expiry, rid))
        st.held += estimate
        wait_s = -(-(window + self.PERIOD_MS - now) // 1000)
        headers = [self.POLICY, (b"ratelimit", b'"bench";r=%d;t=%d' % (left - estimate, wait_s))]
        self.in_flight[rid] = (st, time.monotonic() + self.LEASE_MS / 3000)
        handle = _LeastHandle(send, headers)
        scope.setdefault("state", {})["budget"] = handle
        try:
            await self.app(scope, receive, handle.send)
        finally:
            actual = handle.charged if handle.reported else 0 if handle.status >= 400 else estimate
            # As the package does: the handle, left in the scope's state, lets go of the server's
            # send, or scope -> handle -> send -> scope is a cycle for the collector every request.
            handle.closed = True
            handle._send = None
            del self.in_flight[rid]
            entry = st.holds.pop(rid, None)
            if entry is not None:
                st.held -= entry[1]
                if not st.holds:
                    st.heap.clear()
                elif len(st.heap) > 2 * len(st.holds) + 64:  # settled entries: compact
                    st.heap = [e for e in st.heap if e[1] in st.holds]
                    heapq.heapify(st.heap)
            if actual:
                st.spent[window] = st.spent.get(window, 0) + actual
