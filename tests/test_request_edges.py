"""Edges of the request's life that once lost a hold or misled a client: a finalizer lent without its
ledger, ``zerocopysend`` as the final message, a failure between the reserve and the app, and a body
the estimator cannot read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from asgi_helpers import (
    LedgerProxy,
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
)
from budget_middleware import BudgetConfig, BudgetMiddleware, Finalizer, MemoryLedger, Rule
from budget_middleware import middleware as middleware_module
from budget_middleware.budgets import Budget
from budget_middleware.ledger import LedgerNotSent, LedgerUnavailable

pytestmark = pytest.mark.memory

RULE = Rule("user", "header:x-user", "10", "1d")
ALICE = Budget("user", "r:alice", 86_400_000)
HEADERS = [("x-user", "alice")]


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def config(**fields: Any) -> BudgetConfig:
    return BudgetConfig(rules=(RULE,), estimate=fields.pop("estimate", 1_000_000), **fields)


async def spent_and_held(ledger: MemoryLedger) -> tuple[int, int, int]:
    usage = await ledger.usage(ALICE, 10**7)
    return usage.spent, usage.held, usage.holds


async def test_a_finalizer_given_without_a_ledger_lends_its_ledger() -> None:
    """Before, the middleware reserved in a new ledger of its own and settled in the finalizer's:
    every settle was 'recovered' and the holds piled up in the other ledger."""
    ledger = MemoryLedger()
    log = SettlementLog()
    finalizer = Finalizer(ledger, on_settled=log)
    mw = BudgetMiddleware(ok, config(), finalizer=finalizer)
    assert mw.ledger is ledger
    for _ in range(3):
        await mw(http_scope(headers=HEADERS), ScriptedReceive(), RecordingSend())
    await settle_all(finalizer)
    assert log.outcomes == ["applied"] * 3
    assert await spent_and_held(ledger) == (3_000_000, 0, 0)


def test_a_finalizer_of_another_ledger_is_refused() -> None:
    with pytest.raises(ValueError, match="another ledger"):
        BudgetMiddleware(ok, config(), ledger=MemoryLedger(), finalizer=Finalizer(MemoryLedger()))


async def test_zerocopysend_is_a_final_message() -> None:
    """A complete response sent with ``http.response.zerocopysend`` completed (charged the
    estimate); before, it settled as 'error', charged 0."""

    async def zerocopy(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.zerocopysend", "file": 3, "count": 2})

    ledger = MemoryLedger()
    log = SettlementLog()
    mw = BudgetMiddleware(zerocopy, config(), ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    scope = http_scope(headers=HEADERS, extensions={"http.response.zerocopysend": {}})
    await mw(scope, ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    ((settlement, _),) = log.entries
    assert (settlement.reason, settlement.actual) == ("completed", 1_000_000)


async def test_a_failure_between_the_reserve_and_the_app_settles_the_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anything that raises after the reserve (here the RateLimit headers) is inside the settling
    ``try``: before, the hold leaked until its lease ended."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("headers broke")

    monkeypatch.setattr(middleware_module, "admitted_headers", broken)
    ledger = MemoryLedger()
    log = SettlementLog()
    mw = BudgetMiddleware(ok, config(), ledger=ledger, finalizer=Finalizer(ledger, on_settled=log))
    with pytest.raises(RuntimeError, match="headers broke"):
        await mw(http_scope(headers=HEADERS), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    ((settlement, settled),) = log.entries
    assert (settlement.reason, settlement.actual, settled.outcome) == ("error", 0, "applied")
    assert await spent_and_held(ledger) == (0, 0, 0)
    assert mw.finalizer.in_flight == 0


async def estimate_from_json(request: Request) -> Any:
    body = json.loads(await request.body())
    return body["max_cost"]


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b'{"other": 1}', b"[1, 2]", b"\xff\xfe"],
    ids=["invalid-json", "missing-field", "wrong-shape", "not-utf8"],
)
@pytest.mark.parametrize("error_format", ["problem", "openai"])
async def test_a_body_the_estimator_cannot_read_is_a_400_that_changes_no_budget(
    payload: bytes, error_format: str
) -> None:
    """Before, it was a 500, which SDKs retry."""
    ledger = MemoryLedger()
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append("app")
        await ok(scope, receive, send)

    mw = BudgetMiddleware(
        app, config(error_format=error_format), ledger=ledger, estimate=estimate_from_json
    )
    send = RecordingSend()
    await mw(http_scope(method="POST", headers=HEADERS), ScriptedReceive(payload), send)
    assert send.status == 400
    assert send.header("x-should-retry") == "false"
    if error_format == "openai":
        error = send.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "budget_invalid_request")
    else:
        assert send.header("content-type") == "application/problem+json"
        assert "cannot be read" in send.json()["detail"]
    assert calls == []
    assert await spent_and_held(ledger) == (0, 0, 0)


async def test_an_estimator_that_fails_by_itself_is_still_a_500() -> None:
    async def broken(request: Request) -> Any:
        raise RuntimeError("the price table is gone")

    ledger = MemoryLedger()
    mw = BudgetMiddleware(ok, config(), ledger=ledger, estimate=broken)
    send = RecordingSend()
    await mw(http_scope(method="POST", headers=HEADERS), ScriptedReceive(b"{}"), send)
    assert send.status == 500
    assert await spent_and_held(ledger) == (0, 0, 0)


async def test_a_readable_body_is_estimated_and_replayed_to_the_app() -> None:
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await Request(scope, receive).body())
        await ok(scope, receive, send)

    ledger = MemoryLedger()
    mw = BudgetMiddleware(app, config(), ledger=ledger, estimate=estimate_from_json)
    body = b'{"max_cost": "0.25"}'
    send = RecordingSend()
    await mw(http_scope(method="POST", headers=HEADERS), ScriptedReceive(body), send)
    await settle_all(mw.finalizer)
    assert send.status == 200
    assert seen == [body]
    assert await spent_and_held(ledger) == (250_000, 0, 0)


async def test_failing_open_after_the_estimator_read_the_body_replays_it_to_the_app() -> None:
    """Before, the request ran unmetered without the body the estimator had already read."""

    async def broken(request: Request) -> Any:
        await request.body()
        raise RuntimeError("the price table is gone")

    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await Request(scope, receive).body())
        await ok(scope, receive, send)

    ledger = MemoryLedger()
    mw = BudgetMiddleware(app, config(fail_mode="open"), ledger=ledger, estimate=broken)
    send = RecordingSend()
    await mw(http_scope(method="POST", headers=HEADERS), ScriptedReceive(b"payload"), send)
    assert send.status == 200
    assert seen == [b"payload"]
    assert await spent_and_held(ledger) == (0, 0, 0)


@pytest.mark.parametrize(
    ("error", "releases"),
    [(LedgerNotSent("connect refused"), 0), (LedgerUnavailable("reply lost"), 1)],
    ids=["never-sent", "outcome-unknown"],
)
async def test_a_reserve_that_never_reached_the_store_queues_no_release(
    error: Exception, releases: int
) -> None:
    """A reserve refused before it was sent has nothing to undo: its release would only take a
    place in the bounded queue during an outage. One whose outcome is unknown is released."""
    proxy = LedgerProxy(MemoryLedger())

    async def failing(reservation_id: str, holds: Any, lease_ms: int) -> Any:
        raise error

    proxy.reserve = failing  # type: ignore[method-assign]
    log = SettlementLog()
    finalizer = Finalizer(proxy, on_settled=log)
    mw = BudgetMiddleware(ok, config(), ledger=proxy, finalizer=finalizer)
    send = RecordingSend()
    await mw(http_scope(headers=HEADERS), ScriptedReceive(), send)
    assert send.status == 503
    await settle_all(finalizer)
    assert [s.reason for s, _ in log.entries] == ["release-unavailable"] * releases
    assert finalizer.pending == 0


async def test_an_estimate_computed_in_floats_is_held_rounded_up_not_refused() -> None:
    """``max_tokens * price`` in floats (123 * 0.00002 == 0.0024600000000000004) was a 500."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["budget"].estimate)
        await ok(scope, receive, send)

    async def by_tokens(request: Request) -> Any:
        return json.loads(await request.body())["max_tokens"] * 0.00002

    ledger = MemoryLedger()
    mw = BudgetMiddleware(app, config(), ledger=ledger, estimate=by_tokens)
    send = RecordingSend()
    await mw(http_scope(method="POST", headers=HEADERS), ScriptedReceive(b'{"max_tokens": 123}'), send)
    await settle_all(mw.finalizer)
    assert send.status == 200
    assert [str(e) for e in seen] == ["0.00246"]
    assert await spent_and_held(ledger) == (2_460, 0, 0)
