"""Tracing without an SDK: no reserve span is started, yet a propagated trace id still reaches the
settlement; a provider installed later gets spans; a missing private name means spans start."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import budget_middleware.reserving as reserving_module
from asgi_helpers import RecordingSend, ScriptedReceive, SettlementLog, http_scope, settle_all
from budget_middleware import BudgetConfig, BudgetMiddleware, Finalizer, MemoryLedger, Rule
from budget_middleware.telemetry import SPAN_RESERVE, spans_recorded

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def harness() -> tuple[BudgetMiddleware, SettlementLog]:
    config = BudgetConfig(rules=(Rule("user", "header:x-user", 10),), estimate=1)
    ledger = MemoryLedger()
    log = SettlementLog()
    fin = Finalizer(ledger, lease_ms=config.lease_ms, timeout_ms=config.timeout_ms, on_settled=log)
    return BudgetMiddleware(ok_app, config, ledger=ledger, finalizer=fin), log


async def test_remote_parent_without_provider_keeps_the_request_trace_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind API-only instrumentation (a propagated parent, no SDK), the settlement (the
    on_settled hook, the journal record) carries the request's trace id."""
    proxy = trace.ProxyTracer("budget_middleware", "0.1.0")
    monkeypatch.setattr(reserving_module, "tracer", proxy)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    mw, log = harness()
    parent = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), RecordingSend())
    finally:
        otel_context.detach(token)
    await settle_all(mw.finalizer)
    (settlement, _settled) = log.only()
    assert settlement.trace_id == format(TRACE_ID, "032x")
    assert settlement.context == parent


def test_missing_private_name_means_spans_are_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(trace, "_TRACER_PROVIDER")
    assert spans_recorded(trace.ProxyTracer("x"))


async def test_provider_installed_later_gets_reserve_span_via_set_tracer_provider_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    proxy = trace.ProxyTracer("budget_middleware", "0.1.0")
    monkeypatch.setattr(reserving_module, "tracer", proxy)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    mw, _ = harness()
    await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), RecordingSend())
    # what trace.set_tracer_provider does (it can only run once per process)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", sdk)
    await mw(http_scope(headers=[("x-user", "a")]), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    assert [s.name for s in exporter.get_finished_spans()].count(SPAN_RESERVE) == 1
    sdk.shutdown()
