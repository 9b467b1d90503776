"""BudgetMiddleware: every exit path of an ASGI request ends in exactly one settlement (DESIGN.md §6).

Driven with hand-written ``receive``/``send`` (``asgi_helpers``), never ``httpx.ASGITransport``, which
buffers the response and cannot disconnect or cancel mid-stream. Tests run on each ledger backend
(memory, fakeredis, real Redis; the few that bring a ledger of their own, memory only) and check,
after the request: the finish reason, that exactly one settlement was applied (an ``on_settled``
hook on the ``Finalizer`` passed in), and that the budget shows ``held == 0`` and ``spent`` equal to
the expected actual cost, exactly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from asgi_helpers import (
    DEADLINE_S,
    LedgerProxy,
    MessageQueue,
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
    wait_until,
)
from budget_middleware import (
    Budget,
    BudgetConfig,
    BudgetMiddleware,
    Finalizer,
    LedgerUnavailable,
    RedisLedger,
    Rule,
    Usage,
    get_reservation,
    to_micros,
)
from budget_middleware.handle import RequestBudget

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

LIMIT = Decimal("10")
ESTIMATE = to_micros("1.5")
USER = "alice"
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
DAY_S = 86_400
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


def user_rule(**overrides: Any) -> Rule:
    fields: dict[str, Any] = {"name": "user", "key": "header:x-user", "limit": LIMIT, "period": "1d"}
    fields.update(overrides)
    return Rule(**fields)


def default_config(**overrides: Any) -> BudgetConfig:
    fields: dict[str, Any] = {"rules": (user_rule(),), "estimate": ESTIMATE}
    fields.update(overrides)
    return BudgetConfig(**fields)


# =================================================================================================
# The harness: one middleware around one app, on the test's ledger, with a recording finalizer
# =================================================================================================


class Harness:
    """``BudgetMiddleware(app, config, ledger=...)`` with a ``Finalizer`` whose ``on_settled`` hook
    records every settlement, plus the helpers the assertions need."""

    def __init__(
        self,
        app: ASGIApp,
        ledger: Any,
        config: BudgetConfig,
        *,
        estimate: Any = None,
        identify: Any = None,
    ) -> None:
        self.app_calls = 0
        self.inner_app = app
        self.ledger = ledger
        self.config = config
        self.log = SettlementLog()
        self.finalizer = Finalizer(
            ledger,
            lease_ms=config.lease_ms,
            timeout_ms=config.timeout_ms,
            on_settled=self.log,
        )
        self.mw = BudgetMiddleware(
            self._counting_app,
            config,
            ledger=ledger,
            estimate=estimate,
            identify=identify,
            finalizer=self.finalizer,
        )

    async def _counting_app(self, scope: Any, receive: Any, send: Any) -> None:
        self.app_calls += 1
        await self.inner_app(scope, receive, send)

    async def request(
        self,
        *,
        user: str | None = USER,
        headers: list[tuple[str, str]] | None = None,
        receive: Any = None,
        send: RecordingSend | None = None,
        **scope_fields: Any,
    ) -> RecordingSend:
        """Run one request to its end (with a deadline) and return what the client received."""
        all_headers = list(headers or [])
        if user is not None:
            all_headers.append(("x-user", user))
        scope = http_scope(headers=all_headers, **scope_fields)
        send = send if send is not None else RecordingSend()
        with anyio.fail_after(DEADLINE_S):
            await self.mw(scope, receive or ScriptedReceive(), send)
        return send

    def budget(self, entity: str = USER, rule: str = "user") -> Budget:
        matching = [r for r in self.config.rules if r.name == rule]
        assert matching, f"no rule {rule!r}"
        token = entity if entity == "anonymous" else self.mw.hasher.token(entity)
        return Budget(rule, token, matching[0].period_ms)

    async def usage(self, entity: str = USER, rule: str = "user") -> Usage:
        limit = next(r.limit_micros for r in self.config.rules if r.name == rule)
        usage: Usage = await self.ledger.usage(self.budget(entity, rule), limit)
        return usage

    async def assert_untouched(self, entity: str = USER, rule: str = "user") -> None:
        usage = await self.usage(entity, rule)
        assert (usage.spent, usage.held, usage.holds) == (0, 0, 0)

    async def assert_settled_once(
        self,
        reason: str,
        actual: int,
        *,
        entity: str = USER,
        rule: str = "user",
        outcome: str = "applied",
    ) -> None:
        """Exactly one settlement with this reason and actual cost; the budget shows it exactly."""
        await settle_all(self.finalizer)
        settlement, settled = self.log.only()
        assert settlement.reason == reason
        assert settlement.actual == actual
        assert settled.outcome == outcome
        assert self.finalizer.applied == 1
        assert self.finalizer.outcomes == {outcome: 1}
        usage = await self.usage(entity, rule)
        assert usage.held == 0
        assert usage.holds == 0
        assert usage.spent == actual


HarnessFactory = Callable[..., Harness]


@pytest.fixture
async def make_harness(ledger: Any) -> AsyncIterator[HarnessFactory]:
    """``make_harness(app, ledger_override=, estimator=, identify=, **config_fields)``.

    Every finalizer it made is drained at teardown.
    """
    made: list[Harness] = []

    def factory(
        app: ASGIApp,
        *,
        ledger_override: Any = None,
        estimator: Any = None,
        identify: Any = None,
        **config_fields: Any,
    ) -> Harness:
        harness = Harness(
            app,
            ledger_override if ledger_override is not None else ledger,
            default_config(**config_fields),
            estimate=estimator,
            identify=identify,
        )
        made.append(harness)
        return harness

    try:
        yield factory
    finally:
        for harness in made:
            await harness.finalizer.drain(0.2)


# =================================================================================================
# Tiny raw ASGI apps
# =================================================================================================


def start(
    status: int = 200, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain"), *(headers or [])],
        **extra,
    }


def body(data: bytes = b"ok", *, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def respond(
    status: int = 200,
    data: bytes = b"ok",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    charges: tuple[Any, ...] = (),
) -> ASGIApp:
    """An app that charges ``charges`` through the handle and sends one complete response."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        handle = scope["state"]["budget"]
        for amount in charges:
            handle.charge(amount)
        await send(start(status, headers))
        await send(body(data))

    return app


def budget_of(scope: Any) -> RequestBudget:
    handle = scope["state"]["budget"]
    assert isinstance(handle, RequestBudget)
    return handle


class Boom(Exception):
    """The app's own exception."""


# =================================================================================================
# Completed
# =================================================================================================


class TestCompletedResponsesChargeTheEstimateUnlessReported:
    async def test_final_body_completes_and_charges_the_estimate(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond())
        sent = await h.request()
        assert sent.status == 200
        assert sent.body == b"ok"
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_pathsend_completes(self, make_harness: HarnessFactory, tmp_path: Any) -> None:
        path = tmp_path / "file.txt"
        path.write_text("file")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send({"type": "http.response.pathsend", "path": str(path)})

        h = make_harness(app)
        sent = await h.request(extensions={"http.response.pathsend": {}})
        assert sent.types() == ["http.response.start", "http.response.pathsend"]
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_starlette_file_response_over_pathsend_completes(
        self, make_harness: HarnessFactory, tmp_path: Any
    ) -> None:
        from starlette.responses import FileResponse

        path = tmp_path / "file.txt"
        path.write_text("file")

        async def download(request: Request) -> Response:
            return FileResponse(path)

        h = make_harness(Starlette(routes=[Route("/", download)]))
        sent = await h.request(extensions={"http.response.pathsend": {}})
        assert sent.types()[-1] == "http.response.pathsend"
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_streamed_raw_response_completes(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            for chunk in (b"a", b"b", b"c"):
                await send(body(chunk, more=True))
            await send(body(b""))

        h = make_harness(app)
        sent = await h.request()
        assert sent.body == b"abc"
        await h.assert_settled_once("completed", ESTIMATE)

    @pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
    async def test_starlette_streaming_response_completes(
        self, make_harness: HarnessFactory, spec_version: str
    ) -> None:
        async def tokens() -> AsyncIterator[bytes]:
            for word in (b"one ", b"two ", b"three"):
                await anyio.lowlevel.checkpoint()
                yield word

        async def stream(request: Request) -> Response:
            return StreamingResponse(tokens(), media_type="text/plain")

        h = make_harness(Starlette(routes=[Route("/", stream)]))
        sent = await h.request(spec_version=spec_version)
        assert sent.body == b"one two three"
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_starlette_json_response_completes(self, make_harness: HarnessFactory) -> None:
        async def hello(request: Request) -> Response:
            return JSONResponse({"hello": "world"})

        h = make_harness(Starlette(routes=[Route("/", hello)]))
        sent = await h.request()
        assert sent.json() == {"hello": "world"}
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_final_body_then_raising_is_completed_and_the_exception_propagates(
        self, make_harness: HarnessFactory
    ) -> None:
        error = Boom("background work failed")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body())
            raise error

        h = make_harness(app)
        with pytest.raises(Boom) as raised:
            await h.request()
        assert raised.value is error
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_starlette_background_task_raising_after_the_response_is_completed(
        self, make_harness: HarnessFactory
    ) -> None:
        error = Boom("background task failed")

        def fail() -> None:
            raise error

        async def work(request: Request) -> Response:
            return PlainTextResponse("accepted", background=BackgroundTask(fail))

        h = make_harness(Starlette(routes=[Route("/", work)]))
        with pytest.raises(Boom) as raised:
            await h.request()
        assert raised.value is error
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_disconnect_after_the_final_body_is_still_completed(
        self, make_harness: HarnessFactory
    ) -> None:
        receive = ScriptedReceive()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send(start())
            await send(body())
            assert (await receive())["type"] == "http.disconnect"

        receive.disconnect()
        h = make_harness(app)
        await h.request(receive=receive)
        assert receive.disconnects_delivered == 1
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_unknown_message_types_pass_through_untouched(
        self, make_harness: HarnessFactory
    ) -> None:
        custom = {"type": "http.response.debug", "info": {"x": 1}}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(custom)
            await send(body())

        h = make_harness(app)
        sent = await h.request()
        assert sent.messages[1] is custom
        await h.assert_settled_once("completed", ESTIMATE)


# =================================================================================================
# Disconnected
# =================================================================================================


@pytest.fixture(params=["estimate", "zero"])
def charge_on_disconnect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def disconnect_charge(choice: str) -> int:
    return ESTIMATE if choice == "estimate" else 0


class TestDisconnectsChargeTheConfiguredDefault:
    async def test_disconnect_before_the_response_started(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        receive = ScriptedReceive(b'{"prompt": "hi"}')
        waiting = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "http.request"
            waiting.set()
            assert (await receive())["type"] == "http.disconnect"  # the client left: give up

        h = make_harness(app, charge_on_disconnect=charge_on_disconnect)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request(receive=receive))
            with anyio.fail_after(DEADLINE_S):
                await waiting.wait()
            receive.disconnect()
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))

    async def test_disconnect_during_a_streamed_body_spec_2_3(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        """Starlette's StreamingResponse listens for ``http.disconnect`` and stops streaming."""
        never = anyio.Event()

        async def tokens() -> AsyncIterator[bytes]:
            yield b"first "
            await never.wait()  # the model is slow; the client gives up
            yield b"never sent"

        async def stream(request: Request) -> Response:
            return StreamingResponse(tokens(), media_type="text/plain")

        h = make_harness(
            Starlette(routes=[Route("/", stream)]), charge_on_disconnect=charge_on_disconnect
        )
        receive = ScriptedReceive()
        sent = RecordingSend()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request(receive=receive, send=sent, spec_version="2.3"))
            await wait_until(lambda: sent.body == b"first ", what="the first chunk")
            receive.disconnect()
        assert b"never sent" not in sent.body
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))

    async def test_send_raising_oserror_mid_stream_is_a_disconnect(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            for _ in range(10):
                await send(body(b"chunk", more=True))
            await send(body(b""))

        h = make_harness(app, charge_on_disconnect=charge_on_disconnect)
        sent = RecordingSend(fail_after=3)  # start and two chunks reach the client
        with pytest.raises(OSError, match="the client is gone"):
            await h.request(send=sent)
        assert len(sent.messages) == 3
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))

    async def test_send_raising_oserror_on_the_response_start_is_a_disconnect(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        h = make_harness(respond(), charge_on_disconnect=charge_on_disconnect)
        with pytest.raises(OSError, match="the client is gone"):
            await h.request(send=RecordingSend(fail_after=0))
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))

    async def test_send_raising_oserror_on_the_final_body_is_a_disconnect(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        h = make_harness(respond(), charge_on_disconnect=charge_on_disconnect)
        with pytest.raises(OSError, match="the client is gone"):
            await h.request(send=RecordingSend(fail_after=1))
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))

    async def test_starlette_stream_spec_2_4_oserror_is_a_disconnect(
        self, make_harness: HarnessFactory, charge_on_disconnect: str
    ) -> None:
        """Under spec 2.4 Starlette turns the OSError into ``ClientDisconnect`` and raises it."""
        from starlette.requests import ClientDisconnect

        async def tokens() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"token "

        async def stream(request: Request) -> Response:
            return StreamingResponse(tokens(), media_type="text/plain")

        h = make_harness(
            Starlette(routes=[Route("/", stream)]), charge_on_disconnect=charge_on_disconnect
        )
        with pytest.raises(ClientDisconnect):
            await h.request(send=RecordingSend(fail_after=2), spec_version="2.4")
        await h.assert_settled_once("disconnected", disconnect_charge(charge_on_disconnect))


# =================================================================================================
# Error
# =================================================================================================


@pytest.fixture(params=["zero", "estimate"])
def charge_on_error(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestAppErrorsChargeZeroByDefault:
    async def test_raising_before_the_response_started(
        self, make_harness: HarnessFactory, charge_on_error: str
    ) -> None:
        error = Boom("upstream failed")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise error

        h = make_harness(app, charge_on_error=charge_on_error)
        with pytest.raises(Boom) as raised:
            await h.request()
        assert raised.value is error
        expected = ESTIMATE if charge_on_error == "estimate" else 0
        await h.assert_settled_once("error", expected)

    async def test_raising_after_the_response_started(
        self, make_harness: HarnessFactory, charge_on_error: str
    ) -> None:
        error = Boom("stream broke")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"partial", more=True))
            raise error

        h = make_harness(app, charge_on_error=charge_on_error)
        with pytest.raises(Boom) as raised:
            await h.request()
        assert raised.value is error
        expected = ESTIMATE if charge_on_error == "estimate" else 0
        await h.assert_settled_once("error", expected)

    async def test_returning_without_a_final_body_is_an_error(
        self, make_harness: HarnessFactory, charge_on_error: str
    ) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"half", more=True))

        h = make_harness(app, charge_on_error=charge_on_error)
        await h.request()
        expected = ESTIMATE if charge_on_error == "estimate" else 0
        await h.assert_settled_once("error", expected)

    async def test_starlette_500_page_is_completed_with_status_500_and_charges_zero(
        self, make_harness: HarnessFactory, charge_on_error: str
    ) -> None:
        """Starlette's ServerErrorMiddleware sends a whole 500 response, then re-raises: by §6 the
        request completed (its final body went out), and a >= 400 status that reported nothing
        charges zero, whatever ``charge_on_error`` says."""
        error = Boom("handler failed")

        async def handler(request: Request) -> Response:
            raise error

        h = make_harness(Starlette(routes=[Route("/", handler)]), charge_on_error=charge_on_error)
        sent = RecordingSend()
        with pytest.raises(Boom) as raised:
            await h.request(send=sent)
        assert raised.value is error
        assert sent.status == 500
        await h.assert_settled_once("completed", 0)


# =================================================================================================
# Cancelled
# =================================================================================================


@pytest.fixture(params=["estimate", "zero"])
def charge_on_cancel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestCancelledRequestsChargeTheConfiguredDefault:
    @pytest.mark.parametrize("started", [False, True], ids=["before-start", "mid-stream"])
    async def test_cancel_scope_cancels_the_request(
        self, make_harness: HarnessFactory, charge_on_cancel: str, started: bool
    ) -> None:
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if started:
                await send(start())
                await send(body(b"partial", more=True))
            running.set()
            await anyio.sleep_forever()

        h = make_harness(app, charge_on_cancel=charge_on_cancel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await running.wait()
            tg.cancel_scope.cancel()
        expected = ESTIMATE if charge_on_cancel == "estimate" else 0
        await h.assert_settled_once("cancelled", expected)

    async def test_asyncio_task_cancel_propagates_and_settles(
        self, make_harness: HarnessFactory, charge_on_cancel: str
    ) -> None:
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            running.set()
            await asyncio.Event().wait()

        h = make_harness(app, charge_on_cancel=charge_on_cancel)
        task = asyncio.ensure_future(h.request())
        with anyio.fail_after(DEADLINE_S):
            await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        expected = ESTIMATE if charge_on_cancel == "estimate" else 0
        await h.assert_settled_once("cancelled", expected)

    async def test_the_same_cancelled_error_object_propagates(
        self, make_harness: HarnessFactory
    ) -> None:
        mine = asyncio.CancelledError("the app's own")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise mine

        h = make_harness(app)
        with pytest.raises(asyncio.CancelledError) as raised:
            await h.request()
        assert raised.value is mine
        await h.assert_settled_once("cancelled", ESTIMATE)

    async def test_cancel_while_the_reserve_reply_is_lost_releases_the_hold(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        """A reserve whose reply never came is followed by a release (a zero settle) of its id."""
        proxy = LedgerProxy(ledger)
        proxy.lose_reserve_reply = True
        h = make_harness(respond(), ledger_override=proxy)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await proxy.reserved.wait()
            tg.cancel_scope.cancel()
        assert h.app_calls == 0
        await h.assert_settled_once("release-cancelled", 0)


# =================================================================================================
# Status >= 400 with nothing reported charges zero, on every exit path
# =================================================================================================


class TestFailedStatusWithNothingReportedChargesZero:
    async def test_completed_404(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(404, b"not found"))
        assert (await h.request()).status == 404
        await h.assert_settled_once("completed", 0)

    async def test_starlette_http_exception(self, make_harness: HarnessFactory) -> None:
        from starlette.exceptions import HTTPException

        async def handler(request: Request) -> Response:
            raise HTTPException(422, "bad input")

        h = make_harness(Starlette(routes=[Route("/", handler)]))
        assert (await h.request()).status == 422
        await h.assert_settled_once("completed", 0)

    async def test_streamed_502(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(502))
            await send(body(b"upstream ", more=True))
            await send(body(b"failed"))

        h = make_harness(app)
        await h.request()
        await h.assert_settled_once("completed", 0)

    async def test_disconnected_after_a_503_started(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(503))
            await send(body(b"x", more=True))
            await send(body(b"y"))

        h = make_harness(app, charge_on_disconnect="estimate")
        with pytest.raises(OSError, match="the client is gone"):
            await h.request(send=RecordingSend(fail_after=1))
        await h.assert_settled_once("disconnected", 0)

    async def test_error_after_a_500_started(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(500))
            raise Boom

        h = make_harness(app, charge_on_error="estimate")
        with pytest.raises(Boom):
            await h.request()
        await h.assert_settled_once("error", 0)

    async def test_cancelled_after_a_429_started(self, make_harness: HarnessFactory) -> None:
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(429))
            running.set()
            await anyio.sleep_forever()

        h = make_harness(app, charge_on_cancel="estimate")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await running.wait()
            tg.cancel_scope.cancel()
        await h.assert_settled_once("cancelled", 0)


# =================================================================================================
# Reported charges always win
# =================================================================================================


class TestReportedChargesWin:
    async def test_charge_zero_counts_as_a_report(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(charges=(0,)))
        await h.request()
        await h.assert_settled_once("completed", 0)

    async def test_several_charges_add_up_exactly(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(charges=(Decimal("0.25"), 0.5, "0.125", 1)))
        await h.request()
        await h.assert_settled_once("completed", to_micros("1.875"))

    async def test_an_overrun_above_the_estimate_is_charged_in_full(
        self, make_harness: HarnessFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        h = make_harness(respond(charges=("7.25",)))
        with caplog.at_level(logging.INFO, logger="budget_middleware"):
            await h.request()
        await h.assert_settled_once("completed", to_micros("7.25"))
        assert any("overran" in r.getMessage() for r in caplog.records)

    async def test_a_reported_charge_wins_over_a_failed_status(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond(500, charges=("0.2",)))
        await h.request()
        await h.assert_settled_once("completed", to_micros("0.2"))

    async def test_a_reported_charge_wins_on_error(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            budget_of(scope).charge("0.3")
            raise Boom

        h = make_harness(app)
        with pytest.raises(Boom):
            await h.request()
        await h.assert_settled_once("error", to_micros("0.3"))

    async def test_a_reported_charge_wins_on_disconnect(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            budget_of(scope).charge("0.4")
            await send(start())
            await send(body(b"x", more=True))
            await send(body(b"y"))

        h = make_harness(app, charge_on_disconnect="zero")
        with pytest.raises(OSError, match="the client is gone"):
            await h.request(send=RecordingSend(fail_after=2))
        await h.assert_settled_once("disconnected", to_micros("0.4"))

    async def test_a_reported_charge_wins_on_cancel(self, make_harness: HarnessFactory) -> None:
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            budget_of(scope).charge("0.6")
            running.set()
            await anyio.sleep_forever()

        h = make_harness(app, charge_on_cancel="zero")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await running.wait()
            tg.cancel_scope.cancel()
        await h.assert_settled_once("cancelled", to_micros("0.6"))

    async def test_the_charge_header_is_read_and_stripped(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(headers=[(b"X-Budget-Charge", b"0.42"), (b"x-other", b"kept")]))
        sent = await h.request()
        assert sent.header("x-budget-charge") is None
        assert sent.header("x-other") == "kept"
        await h.assert_settled_once("completed", to_micros("0.42"))

    async def test_the_charge_header_adds_to_python_charges(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(headers=[(b"x-budget-charge", b"0.5")], charges=("0.25",)))
        await h.request()
        await h.assert_settled_once("completed", to_micros("0.75"))

    async def test_a_custom_charge_header_name(self, make_harness: HarnessFactory) -> None:
        h = make_harness(
            respond(headers=[(b"x-cost", b"0.01"), (b"x-budget-charge", b"9")]),
            charge_header="x-cost",
        )
        sent = await h.request()
        assert sent.header("x-cost") is None
        assert sent.header("x-budget-charge") == "9"  # not the configured header: left alone
        await h.assert_settled_once("completed", to_micros("0.01"))

    async def test_the_charge_trailer_is_read_and_stripped(self, make_harness: HarnessFactory) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(trailers=True))
            await send(body(b"streamed"))  # not final: trailers follow
            await send(
                {
                    "type": "http.response.trailers",
                    "headers": [(b"x-budget-charge", b"0.33"), (b"x-checksum", b"abc")],
                    "more_trailers": False,
                }
            )

        h = make_harness(app)
        sent = await h.request()
        assert sent.trailers == [(b"x-checksum", b"abc")]
        await h.assert_settled_once("completed", to_micros("0.33"))

    async def test_a_response_that_promised_trailers_is_not_complete_without_them(
        self, make_harness: HarnessFactory
    ) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start(trailers=True))
            await send(body(b"streamed"))
            raise Boom

        h = make_harness(app, charge_on_error="zero")
        with pytest.raises(Boom):
            await h.request()
        await h.assert_settled_once("error", 0)

    @pytest.mark.parametrize("value", [b"abc", b"-1", b"NaN", b"1e999999"])
    async def test_a_bad_charge_header_is_ignored_logged_and_the_estimate_charged(
        self, make_harness: HarnessFactory, caplog: pytest.LogCaptureFixture, value: bytes
    ) -> None:
        h = make_harness(respond(headers=[(b"x-budget-charge", value)]))
        with caplog.at_level(logging.WARNING, logger="budget_middleware"):
            sent = await h.request()
        assert sent.header("x-budget-charge") is None
        assert any("ignoring bad x-budget-charge header" in r.getMessage() for r in caplog.records)
        await h.assert_settled_once("completed", ESTIMATE)

    @pytest.mark.parametrize(
        "amount", [-1, Decimal("-0.5"), float("nan"), "abc", float("inf"), True, "1e999999"]
    )
    async def test_a_bad_charge_raises_value_error_in_app_code_and_changes_nothing(
        self, make_harness: HarnessFactory, amount: Any
    ) -> None:
        seen: list[BaseException] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            handle = budget_of(scope)
            try:
                handle.charge(amount)
            except ValueError as exc:
                seen.append(exc)
            assert not handle.reported
            assert handle.charged == 0
            await send(start())
            await send(body())

        h = make_harness(app)
        await h.request()
        assert len(seen) == 1
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_charge_after_the_response_ended_raises_runtime_error(
        self, make_harness: HarnessFactory
    ) -> None:
        handles: list[RequestBudget] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            handles.append(budget_of(scope))
            await send(start())
            await send(body())

        h = make_harness(app)
        await h.request()
        with pytest.raises(RuntimeError, match="already settled"):
            handles[0].charge(1)
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_get_reservation_in_a_starlette_handler(self, make_harness: HarnessFactory) -> None:
        async def handler(request: Request) -> Response:
            handle = get_reservation(request)
            assert handle is request.state.budget
            assert handle.metered
            assert handle.rules == ("user",)
            assert handle.estimate == Decimal("1.5")
            handle.charge("0.07")
            return PlainTextResponse("ok")

        h = make_harness(Starlette(routes=[Route("/", handler)]))
        await h.request()
        await h.assert_settled_once("completed", to_micros("0.07"))


# =================================================================================================
# Rejections: 429, RateLimit headers, problem and OpenAI bodies
# =================================================================================================

RATELIMIT = re.compile(r'"(?P<rule>[^"]+)";r=(?P<r>\d+)(?:;t=(?P<t>\d+))?')


def window_seconds_left(now_s: float, period_s: int) -> float:
    return (math.floor(now_s / period_s) + 1) * period_s - now_s


class TestRejectedRequests:
    async def test_spent_blocks_429_app_not_called_retry_after_is_the_window_reset(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond(), rules=(user_rule(limit=1),), estimate=to_micros(1))
        assert (await h.request()).status == 200
        assert h.app_calls == 1
        before = time.time()
        sent = await h.request()
        after = time.time()
        assert sent.status == 429
        assert h.app_calls == 1
        retry_after = int(sent.header("retry-after") or "-1")
        assert math.ceil(window_seconds_left(after, DAY_S)) <= retry_after
        assert retry_after <= math.ceil(window_seconds_left(before, DAY_S))
        assert sent.header("ratelimit-policy") == f'"user";q={to_micros(1)};w={DAY_S}'
        assert sent.header("ratelimit") == f'"user";r=0;t={retry_after}'
        assert sent.header("content-type") == "application/problem+json"
        assert sent.header("cache-control") == "no-store"
        problem = sent.json()
        assert problem["type"] == QUOTA_EXCEEDED
        assert problem["status"] == 429
        assert problem["violated-policies"] == ["user"]
        assert problem["budgets"][0]["rule"] == "user"
        assert problem["budgets"][0]["limit"] == "1"
        assert problem["budgets"][0]["remaining"] == "0"
        assert problem["budgets"][0]["retry_helps"] is False
        # Only the admitted request settled; the rejection took and settled nothing.
        await h.assert_settled_once("completed", to_micros(1))

    async def test_holds_block_429_with_a_short_retry_after(self, make_harness: HarnessFactory) -> None:
        release = anyio.Event()
        holding = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            holding.set()
            await release.wait()
            budget_of(scope).charge(0)
            await send(start())
            await send(body())

        h = make_harness(app, rules=(user_rule(limit=1),), estimate=to_micros(1), hold_retry_after_s=7)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await holding.wait()
            rejected = await h.request()
            release.set()
        assert rejected.status == 429
        assert rejected.header("retry-after") == "7"
        assert rejected.json()["budgets"][0]["retry_helps"] is True
        assert h.app_calls == 1
        await h.assert_settled_once("completed", 0)
        # Waiting helped: the hold is gone and the next request is admitted.
        assert (await h.request()).status == 200

    @pytest.mark.parametrize("period", [None, "none"])
    async def test_a_spent_lifetime_budget_has_no_retry_after(
        self, make_harness: HarnessFactory, period: str | None
    ) -> None:
        h = make_harness(respond(), rules=(user_rule(limit=1, period=period),), estimate=to_micros(1))
        assert (await h.request()).status == 200
        sent = await h.request()
        assert sent.status == 429
        assert sent.header("retry-after") is None
        assert sent.header("ratelimit-policy") == f'"user";q={to_micros(1)}'
        assert sent.header("ratelimit") == '"user";r=0'
        assert sent.json()["budgets"][0]["resets_in"] is None

    async def test_an_estimate_above_the_limit_has_no_retry_after(
        self, make_harness: HarnessFactory
    ) -> None:
        """Waiting for the reset cannot help a request that holds more than the whole limit."""
        h = make_harness(respond(), rules=(user_rule(limit=1),), estimate=to_micros(2))
        sent = await h.request()
        assert sent.status == 429
        assert sent.header("retry-after") is None
        assert "tries to hold 2 usd, above the limit itself" in sent.json()["detail"]
        assert h.app_calls == 0

    async def test_an_estimate_larger_than_what_is_left_is_named_in_the_detail(
        self, make_harness: HarnessFactory
    ) -> None:
        """Spend leaves 0.4 of a limit of 1; a request that holds 0.5 is told that its own size
        blocks it, so a client knows that a smaller request (a lower max_tokens) would pass."""
        h = make_harness(
            respond(charges=("0.6",)), rules=(user_rule(limit=1),), estimate=to_micros("0.5")
        )
        assert (await h.request()).status == 200
        await h.assert_settled_once("completed", to_micros("0.6"))
        sent = await h.request()
        assert sent.status == 429
        detail = sent.json()["detail"]
        assert "tries to hold 0.5 usd, more than the 0.4 usd the spend leaves" in detail

    async def test_openai_format_when_spent_blocks(self, make_harness: HarnessFactory) -> None:
        h = make_harness(
            respond(), rules=(user_rule(limit=1),), estimate=to_micros(1), error_format="openai"
        )
        await h.request()
        sent = await h.request()
        assert sent.status == 429
        assert sent.header("content-type") == "application/json"
        assert sent.header("x-should-retry") == "false"
        error = sent.json()["error"]
        assert error["type"] == "insufficient_quota"
        assert error["code"] == "insufficient_quota"
        assert error["param"] is None
        assert "user" in error["message"]

    async def test_openai_format_when_holds_block_says_retry(self, make_harness: HarnessFactory) -> None:
        release = anyio.Event()
        holding = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            holding.set()
            await release.wait()
            await send(start())
            await send(body())

        h = make_harness(app, rules=(user_rule(limit=1),), estimate=to_micros(1), error_format="openai")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request())
            with anyio.fail_after(DEADLINE_S):
                await holding.wait()
            rejected = await h.request()
            release.set()
        assert rejected.status == 429
        assert rejected.header("x-should-retry") == "true"
        assert rejected.header("retry-after") == "1"
        # A rate limit that a short wait lifts, as OpenAI's API words it: the SDKs retry it.
        error = rejected.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "in-flight requests hold the rest" in error["message"]

    async def test_admitted_responses_carry_ratelimit_headers(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond())
        before = time.time()
        sent = await h.request()
        after = time.time()
        assert sent.header("ratelimit-policy") == f'"user";q={to_micros(LIMIT)};w={DAY_S}'
        match = RATELIMIT.fullmatch(sent.header("ratelimit") or "")
        assert match is not None
        assert match["rule"] == "user"
        assert int(match["r"]) == to_micros(LIMIT) - ESTIMATE  # remaining after this request's hold
        assert match["t"] is not None
        assert math.ceil(window_seconds_left(after, DAY_S)) <= int(match["t"])
        assert int(match["t"]) <= math.ceil(window_seconds_left(before, DAY_S))

    async def test_every_rule_is_charged_the_actual_and_named_in_the_headers(
        self, make_harness: HarnessFactory
    ) -> None:
        rules = (user_rule(), Rule("global", "const:all", 100, period="1h"))
        h = make_harness(respond(charges=("0.5",)), rules=rules)
        sent = await h.request()
        assert sent.header("ratelimit-policy") == (
            f'"user";q={to_micros(LIMIT)};w={DAY_S}, "global";q={to_micros(100)};w=3600'
        )
        await settle_all(h.finalizer)
        assert len(h.log) == 1
        for entity, rule in ((USER, "user"), ("all", "global")):
            usage = await h.usage(entity, rule)
            assert (usage.spent, usage.held) == (to_micros("0.5"), 0)

    async def test_a_second_rule_rejecting_takes_no_hold_on_the_first(
        self, make_harness: HarnessFactory
    ) -> None:
        rules = (user_rule(), Rule("global", "const:all", 1, period="1h"))
        h = make_harness(respond(), rules=rules, estimate=to_micros(2))
        sent = await h.request()
        assert sent.status == 429
        assert sent.json()["violated-policies"] == ["global"]
        assert h.app_calls == 0
        await h.assert_untouched()


# =================================================================================================
# Identity: missing, anonymous, ambiguous, identify callables, callable keys
# =================================================================================================


class TestIdentity:
    async def test_on_missing_reject_answers_401_naming_rule_and_source(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond(), rules=(user_rule(on_missing="reject"),))
        sent = await h.request(user=None)
        assert sent.status == 401
        problem = sent.json()
        assert problem["status"] == 401
        assert "'user'" in problem["detail"]
        assert "header:x-user" in problem["detail"]
        assert h.app_calls == 0
        assert len(h.log) == 0

    async def test_on_missing_skip_runs_the_app_unmetered(self, make_harness: HarnessFactory) -> None:
        seen: list[RequestBudget] = []

        async def handler(request: Request) -> Response:
            seen.append(get_reservation(request))
            return PlainTextResponse("free")

        h = make_harness(Starlette(routes=[Route("/", handler)]), rules=(user_rule(on_missing="skip"),))
        sent = await h.request(user=None)
        assert sent.status == 200
        assert sent.header("ratelimit") is None
        assert seen[0].metered is False
        seen[0].charge(1)  # app code may charge an unmetered handle: nothing happens
        await settle_all(h.finalizer)
        assert len(h.log) == 0
        await h.assert_untouched("anonymous")

    async def test_on_missing_anonymous_shares_one_budget(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(charges=("0.5",)), rules=(user_rule(on_missing="anonymous"),))
        await h.request(user=None)
        await h.request(user=None)
        await settle_all(h.finalizer)
        assert h.log.reasons == ["completed", "completed"]
        usage = await h.usage("anonymous")
        assert (usage.spent, usage.held) == (to_micros(1), 0)

    async def test_an_entity_named_anonymous_is_not_the_anonymous_budget(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond(charges=("0.5",)), rules=(user_rule(on_missing="anonymous"),))
        await h.request(user="anonymous")
        await settle_all(h.finalizer)
        await h.assert_untouched("anonymous")

    async def test_a_repeated_identity_header_with_different_values_is_400_and_changes_nothing(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond())
        sent = await h.request(user=None, headers=[("x-user", "alice"), ("x-user", "mallory")])
        assert sent.status == 400
        assert sent.json()["title"] == "Ambiguous budget identity"
        assert h.app_calls == 0
        await settle_all(h.finalizer)
        assert len(h.log) == 0
        await h.assert_untouched("alice")
        await h.assert_untouched("mallory")

    async def test_a_repeated_identity_header_with_one_value_is_admitted(
        self, make_harness: HarnessFactory
    ) -> None:
        h = make_harness(respond())
        sent = await h.request(user=None, headers=[("x-user", "alice"), ("X-User", "alice")])
        assert sent.status == 200
        await h.assert_settled_once("completed", ESTIMATE)

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_identify_callable_names_the_entity_per_rule(
        self, make_harness: HarnessFactory, kind: str
    ) -> None:
        def lookup(request: Request) -> dict[str, str | None]:
            return {"user": "team-" + request.headers["x-team"]}

        async def lookup_async(request: Request) -> dict[str, str | None]:
            await anyio.lowlevel.checkpoint()
            return lookup(request)

        h = make_harness(respond(), identify=lookup if kind == "sync" else lookup_async)
        await h.request(headers=[("x-team", "blue")])
        await h.assert_settled_once("completed", ESTIMATE, entity="team-blue")
        await h.assert_untouched(USER)

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_a_rule_with_a_callable_key(self, make_harness: HarnessFactory, kind: str) -> None:
        def team(request: Request) -> str | None:
            return request.query_params.get("team")

        async def team_async(request: Request) -> str | None:
            await anyio.lowlevel.checkpoint()
            return team(request)

        rule = Rule("team", team if kind == "sync" else team_async, LIMIT, period="1h")
        h = make_harness(respond(), rules=(rule,))
        await h.request(query_string=b"team=red")
        await h.assert_settled_once("completed", ESTIMATE, entity="red", rule="team")

    async def test_a_secret_header_is_stored_as_a_digest(self, make_harness: HarnessFactory) -> None:
        rule = Rule("key", "header:x-api-key", LIMIT)
        h = make_harness(respond(), rules=(rule,))
        await h.request(headers=[("x-api-key", "sk-live-123")])
        await settle_all(h.finalizer)
        settlement, _ = h.log.only()
        entity = settlement.holds[0].budget.entity
        assert entity.startswith("h:")
        assert "sk-live-123" not in entity


# =================================================================================================
# What passes through: excluded paths, websockets, unknown scopes
# =================================================================================================


class TestPassThrough:
    @pytest.mark.parametrize(
        ("path", "root_path", "excluded"),
        [
            ("/health", "", True),
            ("/health/live", "", True),
            ("/docs", "", True),
            ("/docs/index.html", "", True),
            ("/healthz", "", False),
            ("/v1/chat", "", False),
            ("/api/health", "/api", True),
            ("/api/health/live", "/api", True),
            ("/api/v1/chat", "/api", False),
            ("/api/health", "", False),
        ],
    )
    async def test_excluded_paths_relative_to_root_path_pass_unmetered(
        self, make_harness: HarnessFactory, path: str, root_path: str, excluded: bool
    ) -> None:
        seen: list[RequestBudget] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(budget_of(scope))
            await send(start())
            await send(body())

        h = make_harness(app, exclude=("/health", "/docs/"))
        sent = await h.request(path=path, root_path=root_path)
        assert sent.status == 200
        assert seen[0].metered is not excluded
        if excluded:
            assert seen[0].reason == "excluded"
            assert sent.header("ratelimit") is None
            await settle_all(h.finalizer)
            assert len(h.log) == 0
            await h.assert_untouched()
        else:
            await h.assert_settled_once("completed", ESTIMATE)

    @pytest.mark.parametrize("scope_type", ["websocket", "webtransport"])
    async def test_websocket_and_unknown_scopes_pass_through_untouched(
        self, make_harness: HarnessFactory, scope_type: str
    ) -> None:
        seen: list[tuple[Any, Any, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append((scope, receive, send))

        h = make_harness(app)
        scope = {
            "type": scope_type,
            "path": "/ws",
            "headers": [(b"x-user", b"alice")],
            "query_string": b"",
        }
        snapshot = dict(scope)
        receive, send = ScriptedReceive(), RecordingSend()
        await h.mw(scope, receive, send)
        assert len(seen) == 1
        assert seen[0][0] is scope
        assert seen[0][1] is receive
        assert seen[0][2] is send
        assert scope == snapshot
        assert len(h.log) == 0
        await h.assert_untouched()


# =================================================================================================
# Lifespan: the middleware owns the finalizer's life
# =================================================================================================


class TestLifespan:
    async def test_startup_starts_the_finalizer_and_shutdown_drains_it(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        proxy = LedgerProxy(ledger)
        proxy.settle_gate = anyio.Event()  # settlements wait until shutdown was requested
        at_shutdown: dict[str, Any] = {}
        at_complete: dict[str, Any] = {}

        async def handler(request: Request) -> Response:
            get_reservation(request).charge("0.8")
            return PlainTextResponse("ok")

        h = make_harness(Starlette(routes=[Route("/", handler)]), ledger_override=proxy)
        finalizer = h.finalizer

        def on_deliver(message: Message) -> None:
            if message["type"] == "lifespan.shutdown":
                at_shutdown.update(applied=finalizer.applied, pending=finalizer.pending)
                assert proxy.settle_gate is not None
                proxy.settle_gate.set()

        def on_message(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                at_complete.update(applied=finalizer.applied, pending=finalizer.pending)

        receive = MessageQueue(on_deliver=on_deliver)
        send = RecordingSend(on_message=on_message)
        assert not finalizer.running
        async with anyio.create_task_group() as tg:
            scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            tg.start_soon(h.mw, scope, receive, send)
            receive.push({"type": "lifespan.startup"})
            await send.wait_for("lifespan.startup.complete")
            assert finalizer.running

            sent = await h.request()
            assert sent.status == 200
            assert finalizer.pending == 1  # submitted, not yet applied

            receive.push({"type": "lifespan.shutdown"})
            await send.wait_for("lifespan.shutdown.complete")
        receive.close()
        assert at_shutdown == {"applied": 0, "pending": 1}
        assert at_complete == {"applied": 1, "pending": 0}
        assert not finalizer.running
        await h.assert_settled_once("completed", to_micros("0.8"))

    async def test_requests_without_lifespan_start_the_finalizer_lazily(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        h = make_harness(respond(), ledger_override=LedgerProxy(ledger))
        assert not h.finalizer.running
        await h.request()
        await h.assert_settled_once("completed", ESTIMATE)
        assert h.finalizer.running


# =================================================================================================
# Ledger down, estimator failures, estimators
# =================================================================================================


@pytest.fixture
async def dead_ledger() -> AsyncIterator[RedisLedger]:
    """A Redis ledger pointing at a port nothing listens on."""
    dead = RedisLedger(CLOSED_PORT_URL, socket_timeout=1.0)
    try:
        yield dead
    finally:
        await dead.aclose()


@pytest.mark.parametrize("backend", ["memory"])  # the test's own ledger is not the one used here
class TestLedgerUnavailable:
    async def test_fail_closed_answers_503(
        self, make_harness: HarnessFactory, dead_ledger: RedisLedger
    ) -> None:
        h = make_harness(respond(), ledger_override=dead_ledger, fail_mode="closed")
        sent = await h.request()
        assert sent.status == 503
        assert sent.header("content-type") == "application/problem+json"
        assert sent.header("retry-after") == "1"
        problem = sent.json()
        assert problem["type"] == REDUCED_CAPACITY
        assert problem["status"] == 503
        assert h.app_calls == 0

    async def test_fail_closed_openai_format(
        self, make_harness: HarnessFactory, dead_ledger: RedisLedger
    ) -> None:
        h = make_harness(respond(), ledger_override=dead_ledger, error_format="openai")
        sent = await h.request()
        assert sent.status == 503
        assert sent.json()["error"]["code"] == "budget_unavailable"

    async def test_fail_open_runs_the_app_unmetered(
        self, make_harness: HarnessFactory, dead_ledger: RedisLedger
    ) -> None:
        seen: list[RequestBudget] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(budget_of(scope))
            await send(start())
            await send(body())

        h = make_harness(app, ledger_override=dead_ledger, fail_mode="open")
        sent = await h.request()
        assert sent.status == 200
        assert sent.header("ratelimit") is None
        assert seen[0].metered is False
        assert seen[0].reason == "ledger unavailable"


class TestAReserveWithoutAReplyIsReleased:
    async def test_a_reserve_timeout_fails_closed_and_releases_what_it_may_have_held(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        proxy = LedgerProxy(ledger)
        proxy.lose_reserve_reply = True
        h = make_harness(respond(), ledger_override=proxy, timeout_ms=100)
        sent = await h.request()
        assert sent.status == 503
        assert h.app_calls == 0
        await h.assert_settled_once("release-unavailable", 0)


class TestEstimators:
    @pytest.mark.parametrize("fail_mode", ["closed", "open"])
    @pytest.mark.parametrize("failure", ["raises", "garbage"])
    async def test_a_failing_estimator_refuses_or_bypasses_and_changes_nothing(
        self, make_harness: HarnessFactory, fail_mode: str, failure: str
    ) -> None:
        seen: list[RequestBudget] = []

        def estimate(request: Request) -> Any:
            if failure == "raises":
                raise RuntimeError("pricing service down")
            return "about three dollars"

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(budget_of(scope))
            await send(start())
            await send(body())

        h = make_harness(app, estimator=estimate, fail_mode=fail_mode)
        sent = await h.request()
        if fail_mode == "closed":
            assert sent.status == 500
            assert sent.json()["title"] == "Budget estimate failed"
            assert h.app_calls == 0
        else:
            assert sent.status == 200
            assert seen[0].metered is False
        await settle_all(h.finalizer)
        assert len(h.log) == 0
        await h.assert_untouched()

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_the_estimate_is_what_is_held(self, make_harness: HarnessFactory, kind: str) -> None:
        held: list[int] = []

        def estimate(request: Request) -> Decimal:
            return Decimal(request.query_params["cost"])

        async def estimate_async(request: Request) -> Decimal:
            await anyio.lowlevel.checkpoint()
            return estimate(request)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            held.append((await h.usage()).held)
            await send(start())
            await send(body())

        h = make_harness(app, estimator=estimate if kind == "sync" else estimate_async)
        await h.request(query_string=b"cost=2.5")
        assert held == [to_micros("2.5")]
        await h.assert_settled_once("completed", to_micros("2.5"))

    async def test_an_estimator_may_read_the_body_and_the_app_still_gets_it(
        self, make_harness: HarnessFactory
    ) -> None:
        payload = b'{"max_tokens": 300, "prompt": "hello"}'
        app_saw: list[bytes] = []

        async def estimate(request: Request) -> Decimal:
            data = await request.json()
            return Decimal(data["max_tokens"]) / 100

        async def app(scope: Any, receive: Any, send: Any) -> None:
            app_saw.append(await Request(scope, receive).body())
            await send(start())
            await send(body())

        h = make_harness(app, estimator=estimate)
        await h.request(method="POST", receive=ScriptedReceive(payload[:10], payload[10:]))
        assert app_saw == [payload]
        await h.assert_settled_once("completed", to_micros(3))

    async def test_the_config_estimate_is_capped_by_max_hold(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(), estimate=to_micros(5), max_hold=to_micros(2))
        await h.request()
        await h.assert_settled_once("completed", to_micros(2))

    async def test_an_estimator_is_capped_by_max_hold(self, make_harness: HarnessFactory) -> None:
        h = make_harness(respond(), estimator=lambda request: 9, max_hold=to_micros("2.5"))
        await h.request()
        await h.assert_settled_once("completed", to_micros("2.5"))


# =================================================================================================
# Per-request state, lease renewal
# =================================================================================================


class TestConcurrentRequestsKeepTheirOwnState:
    async def test_two_interleaved_requests_do_not_mix(self, make_harness: HarnessFactory) -> None:
        alice_may_finish = anyio.Event()

        def estimate(request: Request) -> int:
            return {"alice": 1, "bob": 3}[request.headers["x-user"]]

        async def app(scope: Any, receive: Any, send: Any) -> None:
            handle = budget_of(scope)
            user = dict(scope["headers"])[b"x-user"]
            if user == b"alice":
                await send(start(headers=[(b"x-budget-charge", b"0.4")]))
                await alice_may_finish.wait()
                handle.charge("0.1")
                await send(body(b"alice"))
            else:
                handle.charge(2)
                await send(start(201))
                await send(body(b"bob"))

        h = make_harness(app, estimator=estimate)
        alice = RecordingSend()
        bob = RecordingSend(fail_after=1)  # bob's client is gone before his body
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.request(user="alice", send=alice))
            await alice.wait_for("http.response.start")
            with pytest.raises(OSError, match="the client is gone"):
                await h.request(user="bob", send=bob)
            alice_may_finish.set()

        assert alice.status == 200
        assert alice.body == b"alice"
        assert bob.status == 201
        assert (alice.header("ratelimit") or "").startswith(
            f'"user";r={to_micros(LIMIT) - to_micros(1)};'
        )
        assert (bob.header("ratelimit") or "").startswith(f'"user";r={to_micros(LIMIT) - to_micros(3)};')
        await settle_all(h.finalizer)
        by_user = {s.holds[0].budget.entity: s for s, _ in h.log.entries}
        alice_s, bob_s = by_user[h.mw.hasher.token("alice")], by_user[h.mw.hasher.token("bob")]
        assert (alice_s.reason, alice_s.actual, alice_s.estimate) == (
            "completed",
            to_micros("0.5"),
            to_micros(1),
        )
        assert (bob_s.reason, bob_s.actual, bob_s.estimate) == (
            "disconnected",
            to_micros(2),
            to_micros(3),
        )
        for user, spent in (("alice", to_micros("0.5")), ("bob", to_micros(2))):
            usage = await h.usage(user)
            assert (usage.spent, usage.held) == (spent, 0)


class TestLeaseRenewal:
    async def test_a_long_request_keeps_its_hold_after_the_finalizer_went_idle(
        self, make_harness: HarnessFactory
    ) -> None:
        """A request admitted while the finalizer sleeps must still get its lease renewed.

        The first request settles and leaves the worker idle; the second outlives its lease three
        times over. Its hold must still be there (renewed), and its settle must be on time.
        """
        lease_s = 0.3
        midway: list[Usage] = []
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if dict(scope["headers"]).get(b"x-slow"):
                running.set()
                started = time.monotonic()
                await wait_until(lambda: time.monotonic() > started + 3 * lease_s, what="three leases")
                midway.append(await h.usage())
            await send(start())
            await send(body())

        h = make_harness(app, lease_ms=int(lease_s * 1000))
        await h.request()
        await settle_all(h.finalizer)
        await wait_until(lambda: h.finalizer.running, what="the worker")  # and now it sleeps
        h.log.entries.clear()
        h.finalizer.applied = 0
        h.finalizer.outcomes.clear()
        spent_before = (await h.usage()).spent

        await h.request(headers=[("x-slow", "1")])
        assert midway[0].held == ESTIMATE, "the hold expired while its request was running"
        await settle_all(h.finalizer)
        _, settled = h.log.only()
        assert settled.outcome == "applied"
        usage = await h.usage()
        assert (usage.spent - spent_before, usage.held) == (ESTIMATE, 0)

    async def test_failing_renewals_back_off(
        self, make_harness: HarnessFactory, ledger: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A ledger outage must not turn lease renewal into a hot loop against the ledger."""
        lease_s = 0.3
        proxy = LedgerProxy(ledger)
        proxy.extend_error = LedgerUnavailable("redis unavailable: connection refused")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            started = time.monotonic()
            await wait_until(lambda: time.monotonic() > started + 2 * lease_s, what="two leases")
            await send(start())
            await send(body())

        h = make_harness(app, ledger_override=proxy, lease_ms=int(lease_s * 1000))
        with caplog.at_level(logging.ERROR, logger="budget_middleware"):
            await h.request()
        # Renewals are due every lease/3 (~6 in two leases); retries may add a few, not thousands.
        # (That renewals happen at all is the test above.)
        assert proxy.extend_calls <= 30, f"{proxy.extend_calls} renewal attempts in 0.6 s"


@pytest.mark.parametrize("backend", ["memory"])  # a ledger whose calls never suspend
class TestFinalizerStartedLazily:
    """Without lifespan the worker task is created on the first request and first runs at the
    next suspension. A request that never suspends (an in-process ledger without ``settle_now``)
    submits its settlement before the worker ever ran; waiting and draining must still see it."""

    async def test_wait_idle_sees_a_settlement_submitted_before_the_worker_first_ran(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        h = make_harness(respond(), ledger_override=LedgerProxy(ledger))
        await h.request()
        assert await h.finalizer.wait_idle(0.5) is True
        await h.assert_settled_once("completed", ESTIMATE)

    async def test_drain_applies_a_settlement_submitted_before_the_worker_first_ran(
        self, make_harness: HarnessFactory, ledger: Any
    ) -> None:
        h = make_harness(respond(), ledger_override=LedgerProxy(ledger))
        await h.request()
        assert await h.finalizer.drain(0.5) == 0
        assert h.finalizer.lost == 0
        await h.assert_settled_once("completed", ESTIMATE)
