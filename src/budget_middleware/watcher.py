"""The response watcher: what an admitted request's response does, as the middleware needs to know.

It wraps the app's ``receive`` and ``send``: it adds the RateLimit headers to the response start,
reads and strips the charge header (and trailer), and records the status, whether the final message
went out (the request completed) and whether the client left first (disconnected).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.types import Message, Receive, Send

from .handle import charge_micros
from .responses import Headers

__all__ = ["ResponseWatcher"]

logger = logging.getLogger("budget_middleware")


class ResponseWatcher:
    """One admitted request's response: made per request, so no per-request state is kept on the
    middleware. Its two wrappers are what the app is called with."""

    __slots__ = (
        "_budget_headers",
        "_charge_header",
        "_receive",
        "_send",
        "ended",
        "expect_trailers",
        "header_charged",
        "header_reported",
        "reservation_id",
        "status",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        budget_headers: Headers,
        charge_header: bytes,
        reservation_id: str,
    ) -> None:
        self._receive = receive
        self._send = send
        self._budget_headers = budget_headers
        self._charge_header = charge_header
        self.reservation_id = reservation_id
        self.status = 0
        self.header_charged = 0  # reported in the charge header or trailer, in micro-units
        self.header_reported = False
        self.expect_trailers = False
        # "completed" once the final message went out, "disconnected" if the client left first.
        self.ended = ""

    def release(self) -> None:
        """Let go of the server's callables once the app returned: the handle stays in the scope's
        state, and scope -> state -> ... -> send -> connection -> scope would be a reference cycle
        that keeps every finished connection alive until the cyclic collector runs."""
        self._receive = _receive_after_end
        self._send = _send_after_end

    async def receive_watching_disconnect(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.ended:
            self.ended = "disconnected"
        return message

    async def send_with_budget_headers(self, message: Message) -> None:
        kind = message["type"]
        final = False
        if kind == "http.response.start":
            self.status = message["status"]
            self.expect_trailers = message.get("trailers", False)  # read for its truth only
            raw = message.get("headers", ())
            # Only a header whose name has the charge header's length can be it: most responses
            # have none, and their headers are concatenated as they are.
            size = len(self._charge_header)
            for header in raw:
                if len(header[0]) == size or type(header) is not tuple:
                    headers = self._without_charge(raw, "header") + self._budget_headers
                    break
            else:
                headers = (
                    raw + self._budget_headers if type(raw) is list else [*raw, *self._budget_headers]
                )
            message = dict(message)  # the app's own message is left as it was
            message["headers"] = headers
        elif kind == "http.response.body" or kind == "http.response.zerocopysend":
            final = not message.get("more_body", False) and not self.expect_trailers
        elif kind == "http.response.trailers":
            message = {**message, "headers": self._without_charge(message.get("headers", ()), "trailer")}
            final = not message.get("more_trailers", False)
        elif kind == "http.response.pathsend":
            final = True
        try:
            await self._send(message)
        except OSError:
            if not self.ended:
                self.ended = "disconnected"
            raise
        if final and not self.ended:
            self.ended = "completed"

    def _without_charge(self, headers: Iterable[tuple[bytes, bytes]], where: str) -> Headers:
        """The headers minus the internal charge header, whose value is read as the cost. Only a
        header whose name has the charge header's length can be it, so most are not lowered."""
        kept = []
        charge_header = self._charge_header
        size = len(charge_header)
        for name, value in headers:
            if len(name) == size and name.lower() == charge_header:
                self._read_charge(value, f"{charge_header.decode()} {where}")
            else:
                kept.append((name, value))
        return kept

    def _read_charge(self, value: bytes, where: str) -> None:
        try:
            self.header_charged += charge_micros(value.decode("latin-1"), where)
            self.header_reported = True
        except ValueError as exc:
            logger.warning("budget: ignoring bad %s on %s: %s", where, self.reservation_id, exc)


async def _receive_after_end() -> Message:
    raise RuntimeError("receive called after the request's app returned")


async def _send_after_end(message: Message) -> None:
    raise RuntimeError("send called after the request's app returned")
