"""Metrics through the OTel metrics API, read back with the SDK's in-memory reader.

Each test swaps the package's instruments for ones made from its own MeterProvider, so nothing
global is set and tests stay independent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.types import Message, Receive, Scope, Send

from asgi_helpers import RecordingSend, ScriptedReceive, http_scope, settle_all
from budget_middleware import BudgetConfig, BudgetMiddleware, Rule, get_reservation, telemetry, to_micros


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(telemetry, "_instruments", telemetry.Instruments(provider.get_meter("t")))
    yield reader
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points (attributes and value)."""
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def by_attr(pts: list[Any], key: str) -> dict[str, Any]:
    return {p.attributes.get(key): p for p in pts}


async def charging_app(scope: Scope, receive: Receive, send: Send) -> None:
    from starlette.requests import Request

    get_reservation(Request(scope, receive)).charge("0.25")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def call(mw: BudgetMiddleware, user: str) -> RecordingSend:
    send = RecordingSend()
    await mw(http_scope(headers=[("x-user", user)]), ScriptedReceive(), send)
    return send


@pytest.mark.parametrize("backend", ["memory", "fakeredis"])
async def test_reservations_settlements_and_spend_are_counted(
    reader: InMemoryMetricReader, backend: str
) -> None:
    ledger: Any
    if backend == "memory":
        from budget_middleware import MemoryLedger

        ledger = MemoryLedger()
    else:
        import fakeredis

        from budget_middleware import RedisLedger

        ledger = RedisLedger(client=fakeredis.FakeAsyncRedis(decode_responses=True))
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "1", "1d"),), estimate=to_micros("0.5"))
    mw = BudgetMiddleware(charging_app, config, ledger=ledger)
    try:
        statuses = []
        for _ in range(5):
            statuses.append((await call(mw, "alice")).status)
            await settle_all(mw.finalizer)
        assert statuses == [200, 200, 200, 429, 429]  # 0.25 x 3 spent: 0.5 more would pass 1
    finally:
        await mw.finalizer.drain(5)
        await ledger.aclose()

    got = points(reader)
    reservations = by_attr(got["budget.reservations"], telemetry.ATTR.OUTCOME)
    assert reservations["admitted"].value == 3
    assert reservations["rejected"].value == 2
    (settled,) = got["budget.settlements"]
    assert settled.value == 3
    assert dict(settled.attributes) == {
        telemetry.ATTR.REASON: "completed",
        telemetry.ATTR.OUTCOME: "applied",
    }
    (spend,) = got["budget.spend"]
    assert spend.value == 3 * to_micros("0.25")
    assert dict(spend.attributes) == {telemetry.ATTR.RULE: "user"}
    if backend == "fakeredis":  # queued settlements go through the worker and the ledger
        (queue,) = got["budget.finalizer.queue"]
        assert queue.value == 0  # up on submit, down when applied
        durations = by_attr(got["budget.ledger.duration"], telemetry.ATTR.OPERATION)
        assert durations["settle"].count >= 1


async def test_an_unreachable_ledger_is_counted_as_unavailable(
    reader: InMemoryMetricReader,
) -> None:
    from budget_middleware import RedisLedger

    ledger = RedisLedger("redis://127.0.0.1:1/0", socket_timeout=0.5)
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "1", "1d"),), fail_mode="open")
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = BudgetMiddleware(app, config, ledger=ledger)
    try:
        assert (await call(mw, "bob")).status == 200
    finally:
        await mw.finalizer.drain(1)
        await ledger.aclose()
    assert len(seen) == 1  # fail open: the app ran, unmetered
    outcomes = by_attr(points(reader)["budget.reservations"], telemetry.ATTR.OUTCOME)
    assert outcomes["unavailable"].value == 1
    assert outcomes["bypassed"].value == 1
