"""Spans, asserted with the SDK's in-memory exporter (DESIGN.md section 8).

Every reservation has a ``budget.reserve`` span, a child of the request's span; every settlement a
``budget.settle`` span in a trace of its own, linked to its reserve span and carrying the request's
trace id. No raw entity id or credential ever reaches an exported attribute.

The package takes its tracer from the global provider at import time, and the OTel API lets a
process set that provider only once; so each test patches the three module-level ``tracer`` names
with a tracer of its own provider, which keeps tests isolated from each other and from any global
provider another test module may set.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer

import budget_middleware.finalizer as finalizer_module
import budget_middleware.reserving as reserving_module
import budget_middleware.telemetry as telemetry_module
from asgi_helpers import (
    DEADLINE_S,
    LedgerProxy,
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
    wait_until,
)
from budget_middleware import (
    BudgetConfig,
    BudgetMiddleware,
    Finalizer,
    MemoryLedger,
    RedisLedger,
    Rule,
    to_micros,
)
from budget_middleware.telemetry import ATTR, EVENT_HOLD_EXPIRED, SPAN_RESERVE, SPAN_SETTLE

ESTIMATE = to_micros("1.5")
USER = "alice.leakcheck@example.com"  # plain enough to be stored raw (r:<id>) in ledger keys
TOKEN = "sk-leakcheck-0123456789abcdef"  # a bearer credential: always digested
REQUEST_SPAN = "GET /v1/chat"


# =================================================================================================
# Fixtures: an SDK provider per test, the package's tracers patched to it
# =================================================================================================


class Otel:
    def __init__(self, exporter: InMemorySpanExporter, tracer: Tracer) -> None:
        self.exporter = exporter
        self.tracer = tracer

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, f"expected one {name!r} span, got {[s.name for s in self.spans()]}"
        return found[0]


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("budget_middleware", "0.1.0")
    for module in (telemetry_module, reserving_module, finalizer_module):
        monkeypatch.setattr(module, "tracer", tracer)
    try:
        yield Otel(exporter, provider.get_tracer("tests.server"))
    finally:
        provider.shutdown()


class Setup:
    """A middleware around ``app`` with a recording finalizer, and a traced request driver."""

    def __init__(self, app: Any, ledger: Any, otel: Otel, **config_fields: Any) -> None:
        fields: dict[str, Any] = {
            "rules": (
                Rule("user", "header:x-user", 10),
                Rule("key", "bearer", 100, period="30d"),
            ),
            "estimate": ESTIMATE,
        }
        fields.update(config_fields)
        self.config = BudgetConfig(**fields)
        self.ledger = ledger
        self.otel = otel
        self.log = SettlementLog()
        self.finalizer = Finalizer(
            ledger,
            lease_ms=self.config.lease_ms,
            timeout_ms=self.config.timeout_ms,
            on_settled=self.log,
        )
        self.mw = BudgetMiddleware(app, self.config, ledger=ledger, finalizer=self.finalizer)

    async def request(
        self, *, send: RecordingSend | None = None, receive: Any = None, **scope_fields: Any
    ) -> RecordingSend:
        """One request inside a server-style request span (as instrumentation would open)."""
        send = send if send is not None else RecordingSend()
        scope = http_scope(
            "/v1/chat",
            headers=[("x-user", USER), ("authorization", f"Bearer {TOKEN}")],
            **scope_fields,
        )
        with (
            anyio.fail_after(DEADLINE_S),
            self.otel.tracer.start_as_current_span(
                REQUEST_SPAN, record_exception=False, set_status_on_exception=False
            ),
        ):
            await self.mw(scope, receive or ScriptedReceive(), send)
        return send


@pytest.fixture
async def setups(otel: Otel) -> AsyncIterator[list[Setup]]:
    made: list[Setup] = []
    try:
        yield made
    finally:
        for setup in made:
            await setup.finalizer.drain(0.2)


def make(setups: list[Setup], app: Any, otel: Otel, ledger: Any = None, **config: Any) -> Setup:
    setup = Setup(app, ledger if ledger is not None else MemoryLedger(), otel, **config)
    setups.append(setup)
    return setup


# =================================================================================================
# Tiny apps
# =================================================================================================


def start(status: int = 200) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": []}


def body(data: bytes = b"ok", *, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def complete_app(scope: Any, receive: Any, send: Any) -> None:
    scope["state"]["budget"].charge("0.25")
    await send(start())
    await send(body())


async def streaming_app(scope: Any, receive: Any, send: Any) -> None:
    await send(start())
    for chunk in (b"a", b"b", b"c"):
        await send(body(chunk, more=True))
    await send(body(b""))


class Boom(Exception):
    pass


# =================================================================================================
# Assertions on the span pair of one request
# =================================================================================================


def attrs_of(span: ReadableSpan | Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def trace_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


def assert_reserve_under_request(otel: Otel) -> tuple[ReadableSpan, ReadableSpan]:
    request = otel.one(REQUEST_SPAN)
    reserve = otel.one(SPAN_RESERVE)
    assert reserve.parent is not None
    assert reserve.parent.span_id == request.context.span_id
    assert reserve.context.trace_id == request.context.trace_id
    return request, reserve


def assert_settle_linked(
    settle: ReadableSpan, reserve: ReadableSpan, request: ReadableSpan
) -> dict[str, Any]:
    assert settle.name == SPAN_SETTLE
    assert settle.parent is None  # a trace of its own: the request's span may be long gone
    assert settle.context.trace_id != request.context.trace_id
    assert len(settle.links) == 1
    link = settle.links[0]
    assert link.context.trace_id == reserve.context.trace_id
    assert link.context.span_id == reserve.context.span_id
    attrs = attrs_of(settle)
    assert attrs[ATTR.TRACE_ID] == trace_hex(request.context.trace_id)
    assert attrs[ATTR.RESERVATION_ID] == attrs_of(reserve)[ATTR.RESERVATION_ID]
    return attrs


async def assert_one_request_traced(
    setup: Setup, *, reason: str, actual: int, estimate: int = ESTIMATE
) -> None:
    await settle_all(setup.finalizer)
    request, reserve = assert_reserve_under_request(setup.otel)
    reserve_attrs = attrs_of(reserve)
    assert reserve_attrs[ATTR.OUTCOME] == "admitted"
    assert reserve_attrs[ATTR.ESTIMATE] == estimate
    assert tuple(reserve_attrs[ATTR.RULES]) == ("user", "key")
    assert reserve.status.status_code is not StatusCode.ERROR
    attrs = assert_settle_linked(setup.otel.one(SPAN_SETTLE), reserve, request)
    assert attrs[ATTR.REASON] == reason
    assert attrs[ATTR.OUTCOME] == "applied"
    assert attrs[ATTR.ACTUAL] == actual
    assert attrs[ATTR.ESTIMATE] == estimate
    assert attrs[ATTR.LATE] is False
    setup.log.only()


# =================================================================================================
# Every exit path
# =================================================================================================


class TestEveryExitPathIsTraced:
    async def test_completed(self, otel: Otel, setups: list[Setup]) -> None:
        setup = make(setups, complete_app, otel)
        await setup.request()
        await assert_one_request_traced(setup, reason="completed", actual=to_micros("0.25"))

    async def test_streamed(self, otel: Otel, setups: list[Setup]) -> None:
        setup = make(setups, streaming_app, otel)
        sent = await setup.request()
        assert sent.body == b"abc"
        await assert_one_request_traced(setup, reason="completed", actual=ESTIMATE)

    async def test_disconnected(self, otel: Otel, setups: list[Setup]) -> None:
        setup = make(setups, streaming_app, otel)
        with pytest.raises(OSError, match="the client is gone"):
            await setup.request(send=RecordingSend(fail_after=2))
        await assert_one_request_traced(setup, reason="disconnected", actual=ESTIMATE)

    async def test_disconnected_via_receive(self, otel: Otel, setups: list[Setup]) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            assert (await receive())["type"] == "http.disconnect"

        receive = ScriptedReceive()
        receive.disconnect()
        setup = make(setups, app, otel, charge_on_disconnect="zero")
        await setup.request(receive=receive)
        await assert_one_request_traced(setup, reason="disconnected", actual=0)

    async def test_error(self, otel: Otel, setups: list[Setup]) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            raise Boom("upstream failed")

        setup = make(setups, app, otel)
        with pytest.raises(Boom):
            await setup.request()
        await assert_one_request_traced(setup, reason="error", actual=0)

    async def test_cancelled(self, otel: Otel, setups: list[Setup]) -> None:
        running = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            running.set()
            await anyio.sleep_forever()

        setup = make(setups, app, otel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: setup.request())
            with anyio.fail_after(DEADLINE_S):
                await running.wait()
            tg.cancel_scope.cancel()
        await assert_one_request_traced(setup, reason="cancelled", actual=ESTIMATE)

    async def test_overrun_is_an_event_on_the_settle_span(self, otel: Otel, setups: list[Setup]) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope["state"]["budget"].charge(4)
            await send(start())
            await send(body())

        setup = make(setups, app, otel)
        await setup.request()
        await assert_one_request_traced(setup, reason="completed", actual=to_micros(4))
        settle = otel.one(SPAN_SETTLE)
        assert attrs_of(settle)[ATTR.OVERRUN] == to_micros(4) - ESTIMATE
        assert any(e.name == "budget.overrun" for e in settle.events)


# =================================================================================================
# Requests that never reach the app, or reach it unmetered
# =================================================================================================


@pytest.fixture
async def dead_ledger() -> AsyncIterator[RedisLedger]:
    dead = RedisLedger("redis://127.0.0.1:1/0", socket_timeout=1.0)
    try:
        yield dead
    finally:
        await dead.aclose()


class TestRefusedAndBypassedRequestsAreTraced:
    async def test_rejected(self, otel: Otel, setups: list[Setup]) -> None:
        setup = make(
            setups,
            complete_app,
            otel,
            rules=(Rule("user", "header:x-user", 1), Rule("key", "bearer", 100)),
            estimate=to_micros(2),
        )
        sent = await setup.request()
        assert sent.status == 429
        _, reserve = assert_reserve_under_request(otel)
        attrs = attrs_of(reserve)
        assert attrs[ATTR.OUTCOME] == "rejected"
        assert tuple(attrs[ATTR.VIOLATED]) == ("user",)
        assert tuple(attrs[ATTR.LIMITS]) == (to_micros(1),)
        assert otel.spans(SPAN_SETTLE) == []

    async def test_fail_open_bypass(
        self, otel: Otel, setups: list[Setup], dead_ledger: RedisLedger
    ) -> None:
        setup = make(setups, complete_app, otel, ledger=dead_ledger, fail_mode="open")
        sent = await setup.request()
        assert sent.status == 200
        _, reserve = assert_reserve_under_request(otel)
        assert attrs_of(reserve)[ATTR.OUTCOME] == "unavailable"
        assert reserve.status.status_code is StatusCode.ERROR
        assert any(e.name == "exception" for e in reserve.events)
        assert otel.spans(SPAN_SETTLE) == []  # the release waits for the ledger to come back

    async def test_fail_closed(self, otel: Otel, setups: list[Setup], dead_ledger: RedisLedger) -> None:
        setup = make(setups, complete_app, otel, ledger=dead_ledger, fail_mode="closed")
        sent = await setup.request()
        assert sent.status == 503
        _, reserve = assert_reserve_under_request(otel)
        assert attrs_of(reserve)[ATTR.OUTCOME] == "unavailable"
        assert reserve.status.status_code is StatusCode.ERROR
        assert otel.spans(SPAN_SETTLE) == []

    async def test_estimator_failure(self, otel: Otel, setups: list[Setup]) -> None:
        def estimate(request: Any) -> Decimal:
            raise RuntimeError("pricing down")

        setup = make(setups, complete_app, otel)
        setup.mw = BudgetMiddleware(
            complete_app, setup.config, ledger=setup.ledger, estimate=estimate, finalizer=setup.finalizer
        )
        sent = await setup.request()
        assert sent.status == 500
        _, reserve = assert_reserve_under_request(otel)
        assert attrs_of(reserve)[ATTR.OUTCOME] == "error"
        assert reserve.status.status_code is StatusCode.ERROR


# =================================================================================================
# Late and duplicate settlements
# =================================================================================================


class TestLateAndDuplicateSettlements:
    async def test_a_late_settle_after_its_hold_expired_and_was_purged(
        self, otel: Otel, setups: list[Setup], ledger: Any
    ) -> None:
        """A's settlement is held up (the ledger is slow) past A's lease; B's reserve purges A's
        expired hold (an event on B's reserve span); A's settle then lands late, still counted."""
        lease_s = 0.1
        proxy = LedgerProxy(ledger)
        proxy.settle_gate = anyio.Event()
        setup = make(setups, complete_app, otel, ledger=proxy, lease_ms=int(lease_s * 1000))

        reserved_at = time.time()
        await setup.request()  # A: settled into the gated queue
        request_a, reserve_a = assert_reserve_under_request(otel)
        a_id = attrs_of(reserve_a)[ATTR.RESERVATION_ID]
        await wait_until(lambda: time.time() > reserved_at + 2 * lease_s, what="A's lease to pass")

        otel.exporter.clear()
        await setup.request()  # B: same budgets, purges A's expired hold
        _, reserve_b = assert_reserve_under_request(otel)
        expired = [e for e in reserve_b.events if e.name == EVENT_HOLD_EXPIRED]
        assert expired, "B's reserve did not report A's expired hold"
        assert {attrs_of(e)[ATTR.RESERVATION_ID] for e in expired} == {a_id}

        proxy.settle_gate.set()
        await settle_all(setup.finalizer)
        settles = {attrs_of(s)[ATTR.RESERVATION_ID]: s for s in otel.spans(SPAN_SETTLE)}
        attrs = assert_settle_linked(settles[a_id], reserve_a, request_a)
        assert attrs[ATTR.OUTCOME] == "late"
        assert attrs[ATTR.LATE] is True
        assert attrs[ATTR.REASON] == "completed"
        assert attrs[ATTR.ACTUAL] == to_micros("0.25")
        assert len(setup.log) == 2
        settlement_a = next(s for s, _ in setup.log.entries if s.reservation_id == a_id)
        for hb in settlement_a.holds:  # both requests charged 0.25 to each of the two budgets
            usage = await ledger.usage(hb.budget, hb.limit)
            assert (usage.spent, usage.held) == (2 * to_micros("0.25"), 0)

    async def test_a_duplicate_settle_is_traced_and_changes_nothing(
        self, otel: Otel, setups: list[Setup], ledger: Any
    ) -> None:
        setup = make(setups, complete_app, otel, ledger=ledger)
        await setup.request()
        await settle_all(setup.finalizer)
        request, reserve = assert_reserve_under_request(otel)
        settlement, _ = setup.log.only()

        setup.finalizer.submit(settlement)  # a retry of a settlement that was applied already
        await settle_all(setup.finalizer)
        first, second = sorted(otel.spans(SPAN_SETTLE), key=lambda s: s.end_time or 0)
        assert attrs_of(first)[ATTR.OUTCOME] == "applied"
        attrs = assert_settle_linked(second, reserve, request)
        assert attrs[ATTR.OUTCOME] == "duplicate"
        assert attrs[ATTR.ACTUAL] == to_micros("0.25")
        assert setup.finalizer.outcomes == {"applied": 1, "duplicate": 1}
        user_budget = settlement.holds[0].budget
        usage = await ledger.usage(user_budget, to_micros(10))
        assert (usage.spent, usage.held) == (to_micros("0.25"), 0)


# =================================================================================================
# No raw entity id or credential in any exported span
# =================================================================================================


def exported_strings(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every string a span exporter would ship: names, attributes, events, links, statuses."""
    out: list[str] = []

    def add(attributes: Any) -> None:
        for key, value in dict(attributes or {}).items():
            out.append(str(key))
            values = value if isinstance(value, (list, tuple)) else [value]
            out.extend(str(v) for v in values)

    for span in spans:
        out.append(span.name)
        add(span.attributes)
        for event in span.events:
            out.append(event.name)
            add(event.attributes)
        for link in span.links:
            add(link.attributes)
        out.append(span.status.description or "")
    return out


class TestNoRawIdsInSpans:
    async def test_no_raw_entity_id_or_bearer_token_is_exported(
        self, otel: Otel, setups: list[Setup], ledger: Any
    ) -> None:
        async def overrunning_app(scope: Any, receive: Any, send: Any) -> None:
            scope["state"]["budget"].charge(9)
            await send(start())
            await send(body())

        setup = make(setups, overrunning_app, otel, ledger=ledger)
        await setup.request()  # admitted, overrun (9 of 10 spent)
        await setup.request()  # rejected: the user budget is spent
        await settle_all(setup.finalizer)
        setup.finalizer.submit(setup.log.entries[0][0])  # and a duplicate settle
        await settle_all(setup.finalizer)
        names = [s.name for s in otel.spans()]
        assert names.count(SPAN_RESERVE) == 2
        assert names.count(SPAN_SETTLE) == 2

        strings = exported_strings(otel.spans())
        for secret in (USER, TOKEN, "alice.leakcheck", "leakcheck-0123"):
            leaks = [s for s in strings if secret in s]
            assert leaks == [], f"{secret!r} exported in {leaks}"
        for span in otel.spans(SPAN_RESERVE) + otel.spans(SPAN_SETTLE):
            entities = attrs_of(span)[ATTR.ENTITIES]
            assert all(e.startswith("h:") for e in entities), entities
            assert tuple(entities) == (
                setup.mw.hasher.for_span(setup.mw.hasher.token(USER)),
                setup.mw.hasher.for_span(setup.mw.hasher.token(TOKEN.encode(), secret=True)),
            )

    async def test_the_raw_id_opt_in_does_show_the_id(self, otel: Otel, setups: list[Setup]) -> None:
        """The control for the test above: with ``span_raw_ids`` the same grep finds the id."""
        setup = make(setups, complete_app, otel, span_raw_ids=True)
        await setup.request()
        await settle_all(setup.finalizer)
        strings = exported_strings(otel.spans())
        assert any(USER in s for s in strings)
        assert not any(TOKEN in s for s in strings)  # a credential is stored as a digest anyway
