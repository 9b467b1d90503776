"""More of the lean path: the ledger clock read its id shares with the reserve, and the budgets it
finds by a header's bytes."""

from __future__ import annotations

import time

import pytest
from starlette.types import Receive, Scope, Send

from asgi_helpers import (
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
    without_telemetry_sdk,
)
from budget_middleware import BudgetConfig, BudgetMiddleware, Finalizer, MemoryLedger, Rule
from budget_middleware.budgets import Budget
from budget_middleware.identity import AmbiguousEntity, KeySource, header_id, header_value, plain_id
from budget_middleware.ledger import Rejection, new_reservation_id
from budget_middleware.ledger._types import id_time_ms

NOW_MS = time.time_ns() // 1_000_000


@pytest.fixture(autouse=True)
def no_telemetry_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    without_telemetry_sdk(monkeypatch)


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def test_the_lean_paths_id_carries_the_ledgers_time() -> None:
    log = SettlementLog()
    ledger = MemoryLedger(clock=lambda: NOW_MS - 5_000)
    config = BudgetConfig(rules=(Rule("user", "header:x-user", "10", "1d"),), estimate=1)
    finalizer = Finalizer(ledger, on_settled=log)
    mw = BudgetMiddleware(ok_app, config, ledger=ledger, finalizer=finalizer)
    assert mw._reserve_hold is not None
    await mw(http_scope(headers=[("x-user", "alice")]), ScriptedReceive(), RecordingSend())
    await settle_all(finalizer)
    ((settlement, settled),) = log.entries
    assert id_time_ms(settlement.reservation_id) == NOW_MS - 5_000
    assert settled.outcome == "applied"


def test_a_reserve_given_the_ledgers_time_is_the_reserve_that_reads_it() -> None:
    budget = Budget("user", "r:a", 86_400_000)
    rid = new_reservation_id(NOW_MS)
    read = MemoryLedger(clock=lambda: NOW_MS).reserve_hold(rid, budget, 10, 4, 60_000)

    def unread() -> int:
        raise AssertionError("a reserve given its time reads no clock")

    given = MemoryLedger(clock=unread).reserve_hold(rid, budget, 10, 4, 60_000, NOW_MS)
    assert not isinstance(read, Rejection)
    assert not isinstance(given, Rejection)
    assert (read[0], *read[2:]) == (given[0], *given[2:])  # all but the epoch, which is random


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-user", b"alice")],
        [(b"X-User", b" alice "), (b"x-user", b"alice")],
        [(b"x-user", "h\u00e9".encode())],
        [(b"x-user", b"a"), (b"x-user", b"b")],
        [(b"x-user", b"")],
        [],
    ],
)
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


async def test_a_header_id_has_one_budget_whichever_cache_finds_it() -> None:
    """The budgets found by a header's bytes are those the general lookup makes: ASCII or not,
    first request or returning, on one rule or two."""
    for rules in (
        (Rule("user", "header:x-user", "10", "1d"),),
        (Rule("user", "header:x-user", "10", "1d"), Rule("ip", "client", "10", "1d")),
    ):
        log = SettlementLog()
        ledger = MemoryLedger()
        finalizer = Finalizer(ledger, on_settled=log)
        mw = BudgetMiddleware(
            ok_app, BudgetConfig(rules=rules, estimate=1), ledger=ledger, finalizer=finalizer
        )
        ids = [b"alice", "h\u00e9".encode(), b"alice", "h\u00e9".encode()]
        for raw in ids:
            await mw(http_scope(headers=[(b"x-user", raw)]), ScriptedReceive(), RecordingSend())
        await settle_all(finalizer)
        entities = [s.holds[0].budget.entity for s, _ in log.entries]
        expected = [mw.hasher.token(plain_id(raw)) for raw in ids]
        assert entities == expected
        assert set(mw._header_budgets[0]) == {b"alice", "h\u00e9".encode()}
