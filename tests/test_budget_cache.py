"""The per-rule budget cache gives exactly the budget that building it afresh gives, stays bounded
and never keys a credential by its raw value; through the middleware, each id (a hostile one too)
gets its own budget, whichever cache finds it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from asgi_helpers import RecordingSend, ScriptedReceive, SettlementLog, http_scope, settle_all
from budget_middleware import BudgetConfig, BudgetMiddleware, Finalizer, MemoryLedger, Rule
from budget_middleware.budgets import Budget
from budget_middleware.identity import plain_id
from budget_middleware.resolve import ANONYMOUS as _ANONYMOUS
from budget_middleware.resolve import BUDGET_CACHE as _BUDGET_CACHE


async def app(scope: Any, receive: Any, send: Any) -> None:
    return None


def uncached(mw: BudgetMiddleware, i: int, raw: Any) -> Budget:
    """The budget built afresh for rule i and id raw (raw None: anonymous), as before the cache."""
    rule = mw._rules[i]
    secret = rule.secret or (rule.source is not None and rule.source.secret)
    token = _ANONYMOUS if raw is None else mw.hasher.token(raw, secret=secret)
    return Budget(rule.name, token, rule.period_ms)


def build(secret: str | None = None) -> BudgetMiddleware:
    config = BudgetConfig(
        rules=(
            Rule("plain", "header:x-user", 10),
            Rule("secret", "header:x-user", 10, secret=True),  # same source, secret rule
            Rule("auth", "header:authorization", 10),  # secret by its header
            Rule("bearer", "bearer", 10),
            Rule("lifetime", "header:x-user", 10, period=None) if False else Rule("q", "query:k", 10),
        ),
        estimate=1,
        secret=secret,
    )
    return BudgetMiddleware(app, config, ledger=MemoryLedger())


def ids(mw: BudgetMiddleware) -> list[Any]:
    digest_of_alice = mw.hasher.digest("alice")
    return [
        None, "alice", b"alice", "anonymous", "r:alice", "h:" + "0" * 32, digest_of_alice,
        digest_of_alice[2:], "r:" + digest_of_alice, "x" * 64, "x" * 65, "x" * 128, "x" * 129,
        "b\xf6b", "b\xf6b".encode("latin-1"), "b\u00f6b".encode(), "\u0661", "a b", "a:b",
        b"", "", "A", "a", "Alice",
    ]  # fmt: skip


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_cached_and_uncached_agree_cold_and_warm(secret: str | None) -> None:
    mw = build(secret)
    values = ids(mw)
    for _ in range(3):
        order = list(values)
        random.shuffle(order)
        for raw in order:
            for i in range(len(mw._rules)):
                key = None if raw == "" else raw
                assert mw._resolver._budget(i, key) == uncached(mw, i, key), (i, raw)


def test_no_raw_credential_key_and_bounded() -> None:
    mw = build()
    for n in range(3 * _BUDGET_CACHE):
        for i in range(len(mw._rules)):
            mw._resolver._budget(i, f"user-{n}")
    for i, cache in enumerate(mw._resolver._budgets):
        assert len(cache) <= _BUDGET_CACHE
        if mw._resolver._secret[i]:
            assert all(isinstance(k, str) and k.startswith("h:") and len(k) == 34 for k in cache)


def test_cache_memory_bound_non_ascii() -> None:
    mw = build()
    for n in range(_BUDGET_CACHE + 10):
        mw._resolver._budget(0, ("\U0001f600" * 127) + str(n % 10))
    assert all(len(k) <= 128 for k in mw._resolver._budgets[0] if k is not None)


# -- through the middleware -------------------------------------------------------------------


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def logged(rules: tuple[Rule, ...], **config: Any) -> tuple[BudgetMiddleware, SettlementLog]:
    """A middleware on a memory ledger whose settlements are logged."""
    ledger = MemoryLedger()
    log = SettlementLog()
    mw = BudgetMiddleware(
        ok_app,
        BudgetConfig(rules=rules, **config),
        ledger=ledger,
        finalizer=Finalizer(ledger, on_settled=log),
    )
    return mw, log


def entities(log: SettlementLog) -> list[str]:
    return [s.holds[0].budget.entity for s, _ in log.entries]


# Identity headers a client may send to confuse the caches, and the status each gets.
HOSTILE_HEADERS: list[tuple[list[tuple[bytes, bytes]], int]] = [
    ([(b"x-user", b"a" * 10_000)], 200),  # long: a digest, never kept
    ([(b"x-user", b"\xff\xfe\x80")], 200),  # not UTF-8: a digest
    ([(b"x-user", b"\xff\xfe\x80"), (b"x-user", b"\xff\xfe\x80")], 200),  # repeated, one value
    ([(b"x-user", b"a"), (b"x-user", b"b")], 400),  # repeated, two values: ambiguous
    ([(b"X-User", b"a")], 200),  # the header name in any case
    ([(b"x-user", b"  ")], 401),  # blank: missing, and this rule rejects that
    ([(b"x-user", b"a" * 129)], 200),  # longer than a raw id or a kept key: a digest, never kept
]


async def test_hostile_ids_get_their_own_budget_and_stay_out_of_the_budget_cache() -> None:
    mw, log = logged((Rule("user", "header:x-user", "10", "1d", on_missing="reject"),), estimate=1)
    for _ in range(2):  # first seen, then returning
        for headers, status in HOSTILE_HEADERS:
            send = RecordingSend()
            await mw(http_scope(headers=headers), ScriptedReceive(), send)
            assert send.status == status, headers
    await settle_all(mw.finalizer)
    admitted = [headers[0][1] for headers, status in HOSTILE_HEADERS if status == 200]
    expected = [mw.hasher.token(plain_id(raw)) for raw in admitted]
    assert entities(log) == expected * 2
    assert all(e == "r:a" or (e.startswith("h:") and len(e) == 34) for e in expected)
    for cache in (mw._resolver._budgets[0], mw._resolver._header_budgets[0]):
        assert all(key is None or len(key) <= 128 for key in cache)


async def test_the_budget_cache_is_bounded_on_a_header_rule() -> None:
    mw, _ = logged((Rule("user", "header:x-user", "10", "1d"),))
    for n in range(_BUDGET_CACHE + 10):
        await mw(http_scope(headers=[("x-user", f"u{n}")]), ScriptedReceive(), RecordingSend())
        assert len(mw._resolver._budgets[0]) <= _BUDGET_CACHE
        assert len(mw._resolver._header_budgets[0]) <= _BUDGET_CACHE


async def test_a_cached_budget_is_never_used_for_another_id() -> None:
    """A header rule's cache by bytes: each id gets its own budget, whatever was cached before."""
    mw, log = logged((Rule("user", "header:x-user", "10", "1d"),), estimate=1)
    for user in ("a", "b", "a", "A", "b "):
        await mw(http_scope(headers=[("x-user", user)]), ScriptedReceive(), RecordingSend())
    found = entities(log)
    assert found[0] == found[2] != found[1] == found[4]
    assert found[3] not in (found[0], found[1])


@pytest.mark.parametrize("rules", [1, 2], ids=["one-rule", "two-rules"])
async def test_a_header_id_has_one_budget_whichever_cache_finds_it(rules: int) -> None:
    """The budgets found by a header's bytes are those the general lookup makes: ASCII or not,
    first request or returning, on one rule or two."""
    rule_set: tuple[Rule, ...] = (Rule("user", "header:x-user", "10", "1d"),)
    if rules == 2:
        rule_set += (Rule("ip", "client", "10", "1d"),)
    mw, log = logged(rule_set, estimate=1)
    ids = [b"alice", "h\u00e9".encode(), b"alice", "h\u00e9".encode()]
    for raw in ids:
        await mw(http_scope(headers=[(b"x-user", raw)]), ScriptedReceive(), RecordingSend())
    await settle_all(mw.finalizer)
    assert entities(log) == [mw.hasher.token(plain_id(raw)) for raw in ids]
    assert set(mw._resolver._header_budgets[0]) == {b"alice", "h\u00e9".encode()}
