"""The per-rule budget cache gives exactly the budget that building it afresh gives, stays bounded
and never keys a credential by its raw value."""

from __future__ import annotations

import random
from typing import Any

import pytest

from budget_middleware import BudgetConfig, BudgetMiddleware, MemoryLedger, Rule
from budget_middleware.budgets import Budget
from budget_middleware.middleware import _ANONYMOUS, _BUDGET_CACHE


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
                assert mw._budget(i, key) == uncached(mw, i, key), (i, raw)


def test_no_raw_credential_key_and_bounded() -> None:
    mw = build()
    for n in range(3 * _BUDGET_CACHE):
        for i in range(len(mw._rules)):
            mw._budget(i, f"user-{n}")
    for i, cache in enumerate(mw._budgets):
        assert len(cache) <= _BUDGET_CACHE
        if mw._secret[i]:
            assert all(isinstance(k, str) and k.startswith("h:") and len(k) == 34 for k in cache)


def test_cache_memory_bound_non_ascii() -> None:
    mw = build()
    for n in range(_BUDGET_CACHE + 10):
        mw._budget(0, ("\U0001f600" * 127) + str(n % 10))
    assert all(len(k) <= 128 for k in mw._budgets[0] if k is not None)
