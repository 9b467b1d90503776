"""The request path's fast paths give exactly what the general code they stand in for gives.

Each fast path (plain charge strings, one hold's RateLimit headers, one-pass header ids, budgets
kept per entity id, spans skipped without a tracer provider) is checked against the slower code
it replaces, on ordinary and on awkward input; the caches it keeps stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.types import Receive, Scope, Send

import budget_middleware.handle as handle_module
import budget_middleware.reserving as reserving_module
import budget_middleware.responses as responses_module
from asgi_helpers import RecordingSend, ScriptedReceive, http_scope, settle_all
from budget_middleware import BudgetConfig, BudgetMiddleware, MemoryLedger, Rule, to_micros
from budget_middleware.budgets import Budget
from budget_middleware.handle import charge_micros
from budget_middleware.identity import (
    AmbiguousEntity,
    KeySource,
    _header_values,
    _single,
    header_id,
    header_value,
    plain_id,
)
from budget_middleware.ledger import HeldBudget
from budget_middleware.responses import admitted_headers, rate_limit_headers
from budget_middleware.telemetry import SPAN_RESERVE, spans_recorded

AMOUNTS = [
    "0", "0.000001", "1", "1.5", "007.50", "123456789", "999999999.999999", "1234567890",
    "0.1234567", "1.", ".5", " 2", "2 ", "", ".", "1e3", "+1", "-1", "1_0", "0.0_1",
    "\u0661", "\u00b2", "1.\u00b2", "NaN", "inf", 3, 2.5, "4503599627",
]  # fmt: skip


def micros_or_error(convert: Any, value: Any) -> object:
    try:
        return convert(value)
    except ValueError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("value", AMOUNTS)
def test_a_charge_converts_exactly_as_to_micros_does(value: Any) -> None:
    fast = micros_or_error(lambda v: charge_micros(v, "charge"), value)
    assert fast == micros_or_error(lambda v: to_micros(v, what="charge", round_up=True), value)


def test_the_charge_cache_is_bounded_and_gives_each_string_its_own_value() -> None:
    for n in range(5_000):
        text = f"{n}.{n % 997:03d}"
        assert charge_micros(text, "charge") == n * 1_000_000 + (n % 997) * 1_000
        assert len(handle_module._plain) <= handle_module._PLAIN_CACHE
    # A string cached before a clear and after it is worth the same.
    assert charge_micros("0.25", "charge") == 250_000
    handle_module._plain.clear()
    assert charge_micros("0.25", "charge") == 250_000


@pytest.mark.parametrize(
    "text",
    ["1" * 10_000, "\xff\xfe", "0.1234567", "-1", "NaN", "1e3", "١٢", "1_000", " 1", "1.", ".5", ""],
)
def test_the_charge_cache_keeps_no_string_that_is_not_plain(text: str) -> None:
    handle_module._plain.clear()
    try:
        charge_micros(text, "charge")
    except ValueError:
        pass
    assert text not in handle_module._plain


DAY_MS = 86_400_000
NOW_MS = 1_800_000_000_000

# One budget's RateLimit inputs: (rule, limit, period_ms, remaining, reset_ms, now_ms).
RATELIMIT_CASES = [
    ("user", 100, DAY_MS, 95, DAY_MS, 1_000),
    ("user", 100, 1_000, 0, 1_000, 1_000),  # at the reset: t=0
    ("user", 100, 1_000, -7, 1_001, 1_000),  # an overrun: never a negative remaining
    ("user", 100, 1_000, 10, 999, 1_000),  # reset in the past: zero seconds, not negative
    ("user", 100, 0, 10, None, 1_000),  # a lifetime budget: no reset
    ("user", 10_000_000, DAY_MS, 3, NOW_MS + 1_001, NOW_MS),  # rounded up: t=2
    ("équipe-%d", 10**15, 3_600_000, 10**15 - 1, NOW_MS + 3_600_000, NOW_MS),  # not ASCII, a %
]


@pytest.mark.parametrize("case", RATELIMIT_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_one_holds_ratelimit_headers_are_the_general_ones(
    case: tuple[str, int, int, int, int | None, int],
) -> None:
    rule, limit, period_ms, remaining, reset_ms, now_ms = case
    general = rate_limit_headers([(rule, limit, remaining, period_ms, reset_ms, now_ms)])
    hold = HeldBudget(Budget(rule, "r:alice", period_ms), 5, 0, "e", limit, remaining, reset_ms)
    responses_module._single_policy_cache.clear()
    assert admitted_headers([hold], now_ms) == general  # built
    assert admitted_headers([hold], now_ms) == general  # and again, from the cache


def test_the_ratelimit_policy_cache_is_bounded() -> None:
    for n in range(3_000):
        hold = HeldBudget(Budget("user", "r:alice", DAY_MS), 5, 0, "e", n, n, None)
        admitted_headers([hold], 0)
        assert len(responses_module._single_policy_cache) <= 1024


HEADER_CASES: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"x-user", b"alice")],
    [(b"X-User", b" alice ")],
    [(b"x-user", b""), (b"x-user", b"bob")],
    [(b"x-user", b"bob"), (b"x-user", b"bob")],
    [(b"x-user", b"bob"), (b"x-other", b"eve"), (b"x-user", b"eve")],
    [(b"x-user", b"b\xc3\xb6b")],
    [(b"x-user", b"   ")],
    [(b"X-User", b" alice "), (b"x-user", b"alice")],
    [(b"x-user", "h\u00e9".encode())],
    [(b"x-user", b"\xff\xfe\x80")],
    [(b"x-user", b"a"), (b"x-user", b"b")],
    [(b"x-user", b"")],
]


@pytest.mark.parametrize("headers", HEADER_CASES)
def test_a_header_id_is_found_as_the_general_lookup_finds_it(
    headers: list[tuple[bytes, bytes]],
) -> None:
    source = KeySource.parse("header:x-user")
    scope = {"headers": headers}
    try:
        expected: object = _single(_header_values(scope, b"x-user"), source)
    except AmbiguousEntity as exc:
        expected = ("ambiguous", str(exc))
    try:
        found: object = source.extract(scope)
    except AmbiguousEntity as exc:
        found = ("ambiguous", str(exc))
    assert found == expected


@pytest.mark.parametrize("headers", HEADER_CASES)
def test_a_headers_bytes_decode_to_its_id(headers: list[tuple[bytes, bytes]]) -> None:
    source = KeySource.parse("header:x-user")
    scope = {"headers": headers}
    try:
        value = header_value(scope, b"x-user", source)
    except AmbiguousEntity:
        with pytest.raises(AmbiguousEntity):
            header_id(scope, b"x-user", source)
        return
    assert header_id(scope, b"x-user", source) == (None if value is None else plain_id(value))


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def test_an_id_spelled_anonymous_is_not_the_anonymous_budget() -> None:
    ledger = MemoryLedger()
    config = BudgetConfig(rules=(Rule("user", "header:x-user", 10, on_missing="anonymous"),), estimate=1)
    mw = BudgetMiddleware(ok_app, config, ledger=ledger)
    for headers in ([], [("x-user", "anonymous")], [], [("x-user", "anonymous")]):
        await mw(http_scope(headers=headers), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    entities = {entity for _rule, entity in ledger._states}
    assert entities == {"anonymous", "r:anonymous"}
    for entity in entities:
        budget = Budget("user", entity, config.rules[0].period_ms)
        assert (await ledger.usage(budget, 10)).spent == 2


async def test_a_credential_is_kept_only_as_its_digest() -> None:
    config = BudgetConfig(rules=(Rule("key", "bearer", 10),), estimate=1)
    mw = BudgetMiddleware(ok_app, config, ledger=MemoryLedger())
    await mw(
        http_scope(headers=[("authorization", "Bearer sk-secret")]), ScriptedReceive(), RecordingSend()
    )
    await settle_all(mw.finalizer)
    (cache,) = mw._resolver._budgets
    assert all(isinstance(k, str) and k.startswith("h:") for k in cache)
    assert all("sk-secret" not in budget.entity for budget in cache.values())


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


async def test_a_tracer_provider_installed_after_the_middleware_gets_spans(
    monkeypatch: pytest.MonkeyPatch, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    sdk, exporter = provider
    # A proxy tracer of our own, as trace.get_tracer gives before any provider is installed.
    proxy = trace.ProxyTracer("budget_middleware", "0.1.0")
    monkeypatch.setattr(reserving_module, "tracer", proxy)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    config = BudgetConfig(rules=(Rule("user", "header:x-user", 10),), estimate=1)
    mw = BudgetMiddleware(ok_app, config, ledger=MemoryLedger())
    await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), RecordingSend())
    assert not spans_recorded(proxy)

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", sdk)  # what set_tracer_provider does
    assert spans_recorded(proxy)
    await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    assert [s.name for s in exporter.get_finished_spans() if s.name == SPAN_RESERVE] == [SPAN_RESERVE]


def test_an_sdk_tracer_always_records() -> None:
    assert spans_recorded(TracerProvider().get_tracer("t"))


async def test_long_ids_are_not_kept() -> None:
    config = BudgetConfig(rules=(Rule("user", "header:x-user", 10),), estimate=1)
    mw = BudgetMiddleware(ok_app, config, ledger=MemoryLedger())
    for user in ("alice", "x" * 129):
        await mw(http_scope(headers=[("x-user", user)]), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    assert list(mw._resolver._budgets[0]) == ["alice"]
