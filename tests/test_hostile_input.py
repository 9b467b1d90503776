"""Hostile input: what an untrusted client (or a careless operator) can send, and what it changes.

Every request case runs through ``BudgetMiddleware`` with hand-written ``receive``/``send`` on each
ledger backend (memory, fakeredis, real Redis) and checks:

- the exact response (status, body fields, RateLimit headers);
- which budgets were reserved (a recording ledger proxy sees every ``reserve``), that the charged
  budget moved by exactly the expected amount, and that every other budget involved (seeded with a
  spend beforehand, so "unchanged" means something) did not move at all;
- on Redis, that every key is ``budget:{<rule>:(r:<plain id>|h:<32 hex>|anonymous)}:<part>`` and
  names only the expected budgets, and that a non-plain raw id never appears in a key name;
- that the raw id never appears in a log record or a response body.

Expected entity tokens are computed here independently of ``identity.py`` (HMAC-SHA256 under the
test's ``BUDGET_SECRET``, first 32 hex digits), so a change in how ids are sanitised shows up.
Configuration cases check that ``BudgetConfig.from_env`` names the variable and its bad value, and
never prints a Redis password.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import pytest

from asgi_helpers import (
    DEADLINE_S,
    LedgerProxy,
    RecordingSend,
    ScriptedReceive,
    SettlementLog,
    http_scope,
    settle_all,
)
from budget_middleware import (
    Budget,
    BudgetConfig,
    BudgetMiddleware,
    ConfigError,
    Finalizer,
    HoldRequest,
    RedisLedger,
    Reservation,
    Rule,
    Settlement,
    to_micros,
)
from budget_middleware.handle import RequestBudget
from budget_middleware.ledger import new_reservation_id

SECRET = "hostile-input-test-secret"
LIMIT = Decimal("10")
LIMIT_MICROS = to_micros(LIMIT)
ESTIMATE = to_micros("1.5")
CHARGE = to_micros("0.25")
SEED = to_micros("1")
DAY_MS = 86_400_000
LEASE_MS = 60_000

KEY_RE = re.compile(
    r"budget:\{(?P<rule>[A-Za-z0-9._-]{1,64}):"
    r"(?P<entity>r:[A-Za-z0-9._@-]{1,64}|h:[0-9a-f]{32}|anonymous)\}"
)
# The fields of a budget's hash: fixed names, windows and reservation ids (see lua/_common.lua).
FIELD_RE = re.compile(r"held|epoch|limit|ttl|pa|pc|pm|s:[0-9]+|[htd]:[0-9a-f]{32}")
PROBLEM = "application/problem+json"


def H(raw: str | bytes) -> str:
    """The digest token of ``raw``, computed independently of ``identity.py``."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    return "h:" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()[:32]


def R(raw: str) -> str:
    return "r:" + raw


ANON = "anonymous"


# =================================================================================================
# The harness: a middleware on a recording proxy of the test's ledger
# =================================================================================================


class RecordingLedger(LedgerProxy):
    """The real ledger behind a proxy that records the budgets of every ``reserve``."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.reserve_calls: list[tuple[Budget, ...]] = []

    async def reserve(self, reservation_id: str, holds: Any, lease_ms: int) -> Any:
        self.reserve_calls.append(tuple(h.budget for h in holds))
        return await super().reserve(reservation_id, holds, lease_ms)


App = Callable[[Any, Any, Any], Any]


async def charging_app(scope: Any, receive: Any, send: Any) -> None:
    """Charges ``CHARGE`` (a no-op on an unmetered handle) and answers 200 ``ok``."""
    scope["state"]["budget"].charge("0.25")
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
    )
    await send({"type": "http.response.body", "body": b"ok", "more_body": False})


class Harness:
    def __init__(
        self,
        ledger: Any,
        rules: Sequence[Rule],
        *,
        app: App = charging_app,
        estimate: Any = None,
        identify: Any = None,
        **config_fields: Any,
    ) -> None:
        self.ledger = ledger
        self.proxy = RecordingLedger(ledger)
        self.config = BudgetConfig(rules=tuple(rules), estimate=ESTIMATE, secret=SECRET, **config_fields)
        self.log = SettlementLog()
        self.finalizer = Finalizer(
            self.proxy,
            lease_ms=self.config.lease_ms,
            timeout_ms=self.config.timeout_ms,
            on_settled=self.log,
        )
        self.inner_app = app
        self.app_calls = 0
        self.handles: list[RequestBudget] = []
        self.mw = BudgetMiddleware(
            self._app,
            self.config,
            ledger=self.proxy,
            estimate=estimate,
            identify=identify,
            finalizer=self.finalizer,
        )

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        self.app_calls += 1
        self.handles.append(scope["state"]["budget"])
        await self.inner_app(scope, receive, send)

    async def request(
        self, headers: Sequence[tuple[bytes, bytes]] = (), query_string: bytes = b""
    ) -> RecordingSend:
        scope = http_scope(headers=list(headers), query_string=query_string)
        send = RecordingSend()
        with anyio.fail_after(DEADLINE_S):
            await self.mw(scope, ScriptedReceive(), send)
        return send

    def budget(self, token: str, rule: str = "user") -> Budget:
        period = next(r.period_ms for r in self.config.rules if r.name == rule)
        return Budget(rule, token, period)

    def limit(self, rule: str) -> int:
        return next(r.limit_micros for r in self.config.rules if r.name == rule)

    async def seed(self, token: str, amount: int = SEED, rule: str = "user") -> None:
        """Spend ``amount`` on a budget directly in the ledger (not through the middleware)."""
        budget = self.budget(token, rule)
        rid = new_reservation_id()
        result = await self.ledger.reserve(
            rid, [HoldRequest(budget, self.limit(rule), amount)], LEASE_MS
        )
        assert isinstance(result, Reservation)
        await self.ledger.settle(Settlement(rid, result.holds, amount, "completed", amount))

    async def state(self, token: str, rule: str = "user") -> tuple[int, int, int]:
        usage = await self.ledger.usage(self.budget(token, rule), self.limit(rule))
        return (usage.spent, usage.held, usage.holds)


HarnessFactory = Callable[..., Harness]


@pytest.fixture
async def make_harness(ledger: Any) -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    def factory(rules: Sequence[Rule], **kwargs: Any) -> Harness:
        harness = Harness(ledger, rules, **kwargs)
        made.append(harness)
        return harness

    try:
        yield factory
    finally:
        for harness in made:
            await harness.finalizer.drain(0.5)


async def redis_keys(ledger: Any) -> list[str]:
    """Every key in the ledger's Redis (empty on the memory ledger)."""
    if not isinstance(ledger, RedisLedger):
        return []
    return sorted([str(k) async for k in ledger.client().scan_iter(match="*", count=1000)])


async def assert_redis_keys(
    ledger: Any,
    tags: set[tuple[str, str]],
    raw: str | bytes | None,
    *,
    victims: Collection[tuple[str, str]] = (),
) -> None:
    """On Redis: every key has the sanitised layout, names only ``tags``, and holds no raw id.

    ``victims`` are seeded budgets whose own names may contain the raw id (an attacker sending the
    literal text of another budget's token): only the other keys are searched for it.
    """
    if not isinstance(ledger, RedisLedger):
        return
    keys = await redis_keys(ledger)
    found: set[tuple[str, str]] = set()
    searched: list[str] = []
    for key in keys:
        m = KEY_RE.fullmatch(key)
        assert m is not None, f"key outside the sanitised layout: {key!r}"
        for field in await ledger.client().hkeys(key):
            assert FIELD_RE.fullmatch(field), f"field outside the layout: {key!r} {field!r}"
        found.add((m["rule"], m["entity"]))
        if (m["rule"], m["entity"]) not in victims:
            searched.append(key)
    assert found == tags
    if raw is not None and len(raw) >= 4:
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        assert not any(text in key for key in searched), "a raw id appears in a key name"


def assert_not_leaked(
    raw: str | bytes | None, sent: RecordingSend, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile raw id (4+ characters) is neither echoed to the client nor logged."""
    if raw is None or len(raw) < 4:
        return
    needle = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
    assert needle not in sent.body
    assert all(needle not in v for _, v in sent.raw_headers)
    text = needle.decode("latin-1")
    for record in caplog.records:
        assert text not in record.getMessage()


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


def ambiguous(source: str, times: int = 2) -> dict[str, Any]:
    return problem(
        400, "Ambiguous budget identity", f"{source} was sent {times} times with different values"
    )


def missing(rule: str, source: str) -> dict[str, Any]:
    return problem(
        401,
        "Budget identity missing",
        f"rule {rule!r} needs an entity id from {source}, and the request has none",
    )


def assert_admitted_headers(sent: RecordingSend, rule: str, limit: int, remaining: int) -> None:
    assert sent.header("ratelimit-policy") == f'"{rule}";q={limit};w=86400'
    state = sent.header("ratelimit")
    assert state is not None
    assert re.fullmatch(rf'"{rule}";r={remaining};t=\d+', state), state


def assert_problem(sent: RecordingSend, expected: dict[str, Any]) -> None:
    assert sent.status == expected["status"]
    assert sent.header("content-type") == PROBLEM
    assert sent.header("ratelimit") is None
    assert sent.json() == expected


# =================================================================================================
# Identity: headers, bearer tokens and query parameters a client controls
# =================================================================================================


@dataclass(frozen=True)
class IdCase:
    """One request's identity input and what it must do.

    ``charged``: the token of the one budget reserved and charged (None: nothing is reserved).
    ``seeded``: budgets spent beforehand; each must be unchanged afterwards unless it is ``charged``.
    ``status``/``body``: the response; 200 with ``charged`` is metered, 200 without is unmetered.
    ``raw``: the hostile id, which must appear in no key name, log record or response.
    """

    headers: tuple[tuple[bytes, bytes], ...] = ()
    query: bytes = b""
    key: str = "header:x-user"
    on_missing: str = "skip"
    charged: str | None = None
    seeded: tuple[str, ...] = (R("alice"),)
    status: int = 200
    body: dict[str, Any] | None = None
    raw: str | bytes | None = None


def user(*values: bytes | str) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((b"x-user", v.encode("utf-8") if isinstance(v, str) else v) for v in values)


def auth(*values: bytes | str) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((b"authorization", v.encode("latin-1") if isinstance(v, str) else v) for v in values)


BIG10K = "a" * 10_000
BIG100K = "b" * 100_000
DIGEST_OF_A_B = H("a b")
FAKE_DIGEST = "h:" + "0123456789abcdef" * 2
NFC_E = unicodedata.normalize("NFC", "caf\u00e9")
NFD_E = unicodedata.normalize("NFD", "caf\u00e9")
BEARER_REJECT = missing("user", "bearer")
HEADER_REJECT = missing("user", "header:x-user")
QUERY = "query:user"

ID_CASES = [
    # -- size ----------------------------------------------------------------------------------
    pytest.param(IdCase(user(BIG10K), charged=H(BIG10K), raw=BIG10K), id="header-10kB"),
    pytest.param(IdCase(user(BIG100K), charged=H(BIG100K), raw=BIG100K), id="header-100kB"),
    pytest.param(IdCase(user("x" * 64), charged=R("x" * 64)), id="header-64-plain-chars-raw"),
    pytest.param(
        IdCase(user("y" * 65), charged=H("y" * 65), raw="y" * 65), id="header-65-chars-digested"
    ),
    # -- repeats -------------------------------------------------------------------------------
    pytest.param(IdCase(user("alice", "alice"), charged=R("alice")), id="repeat-same-value"),
    pytest.param(
        IdCase((*user("alice"), (b"X-User", b"alice")), charged=R("alice")),
        id="repeat-same-value-name-case",
    ),
    pytest.param(IdCase(user("alice", " alice "), charged=R("alice")), id="repeat-same-after-ows-trim"),
    pytest.param(IdCase(user("alice", ""), charged=R("alice")), id="repeat-with-an-empty-value"),
    pytest.param(
        IdCase(user("alice", "mallory"), status=400, body=ambiguous("header:x-user"), raw="mallory"),
        id="repeat-different-values-400",
    ),
    pytest.param(
        IdCase(user("alice", "Alice"), status=400, body=ambiguous("header:x-user")),
        id="repeat-differs-in-case-400",
    ),
    pytest.param(
        IdCase(user("alice", "bob", "carol"), status=400, body=ambiguous("header:x-user", 3)),
        id="repeat-three-values-400",
    ),
    # -- bytes that must never reach a key -----------------------------------------------------
    pytest.param(
        IdCase(user(b"\xff\xfe\xfdalice"), charged=H(b"\xff\xfe\xfdalice"), raw=b"\xff\xfe\xfdalice"),
        id="non-utf8-bytes",
    ),
    pytest.param(IdCase(user(b"caf\xe9"), charged=H(b"caf\xe9"), raw=b"caf\xe9"), id="latin1-byte"),
    pytest.param(IdCase(user("a{b"), charged=H("a{b")), id="open-brace"),
    pytest.param(IdCase(user("a}b"), charged=H("a}b")), id="close-brace"),
    pytest.param(
        IdCase(user("{user:r:alice}"), charged=H("{user:r:alice}"), raw="{user:r:alice}"),
        id="hash-tag-of-another-budget",
    ),
    pytest.param(
        IdCase(user("x}:spent"), charged=H("x}:spent"), raw="x}:spent"), id="close-brace-key-suffix"
    ),
    pytest.param(IdCase(user("*"), charged=H("*")), id="star"),
    pytest.param(IdCase(user("alice*"), charged=H("alice*"), raw="alice*"), id="glob"),
    pytest.param(
        IdCase(
            user(b"alice\r\nx-user: bob"),
            charged=H(b"alice\r\nx-user: bob"),
            seeded=(R("alice"), R("bob")),
            raw=b"alice\r\nx-user: bob",
        ),
        id="crlf",
    ),
    pytest.param(IdCase(user(b"alice\x00"), charged=H(b"alice\x00"), raw=b"alice\x00"), id="nul"),
    pytest.param(IdCase(user("al ice"), charged=H("al ice"), raw="al ice"), id="inner-space"),
    # -- ids that collide after naive normalisation --------------------------------------------
    pytest.param(IdCase(user(" alice "), charged=R("alice")), id="ows-padding-is-trimmed"),
    pytest.param(IdCase(user("\talice\t"), charged=R("alice")), id="tab-padding-is-trimmed"),
    pytest.param(IdCase(user("Alice"), charged=R("Alice")), id="case-is-kept"),
    pytest.param(IdCase(user("r:alice"), charged=H("r:alice"), raw="r:alice"), id="r-prefixed-id"),
    pytest.param(
        IdCase(
            user(DIGEST_OF_A_B), charged=H(DIGEST_OF_A_B), seeded=(DIGEST_OF_A_B,), raw=DIGEST_OF_A_B
        ),
        id="id-equal-to-a-digest-token",
    ),
    pytest.param(
        IdCase(user(FAKE_DIGEST), charged=H(FAKE_DIGEST), seeded=(FAKE_DIGEST,), raw=FAKE_DIGEST),
        id="id-shaped-like-a-digest",
    ),
    pytest.param(
        IdCase(user("\u00e5lice"), charged=H("\u00e5lice".encode()), raw="\u00e5lice"), id="unicode"
    ),
    pytest.param(
        IdCase(user("\uff41\uff4c\uff49\uff43\uff45"), charged=H("\uff41\uff4c\uff49\uff43\uff45")),
        id="fullwidth-alice",
    ),
    pytest.param(
        IdCase(user(NFD_E), charged=H(NFD_E), seeded=(H(NFC_E),), raw=NFD_E),
        id="nfd-is-not-nfc",
    ),
    # -- anonymous and missing -----------------------------------------------------------------
    pytest.param(
        IdCase(user("anonymous"), on_missing="anonymous", charged=R("anonymous"), seeded=(ANON,)),
        id="literal-anonymous-is-not-the-anonymous-budget",
    ),
    pytest.param(
        IdCase((), on_missing="anonymous", charged=ANON, seeded=(R("anonymous"),)),
        id="missing-header-anonymous",
    ),
    pytest.param(IdCase(user(""), on_missing="anonymous", charged=ANON), id="empty-value-anonymous"),
    pytest.param(IdCase(user(""), seeded=(R("alice"), ANON)), id="empty-value-skip-unmetered"),
    pytest.param(
        IdCase(user(""), on_missing="reject", status=401, body=HEADER_REJECT),
        id="empty-value-reject-401",
    ),
    pytest.param(
        IdCase(user("   "), on_missing="reject", status=401, body=HEADER_REJECT),
        id="blank-value-reject-401",
    ),
    # -- bearer tokens (a credential source: always digested) ----------------------------------
    pytest.param(
        IdCase(auth("Bearer "), key="bearer", on_missing="reject", status=401, body=BEARER_REJECT),
        id="bearer-empty-token-401",
    ),
    pytest.param(
        IdCase(auth("Bearer"), key="bearer", on_missing="reject", status=401, body=BEARER_REJECT),
        id="bearer-scheme-only-401",
    ),
    pytest.param(
        IdCase(
            auth("sk-live-no-scheme"), key="bearer", on_missing="reject", status=401, body=BEARER_REJECT
        ),
        id="bearer-no-scheme-401",
    ),
    pytest.param(
        IdCase(
            auth("Basic dXNlcjpwYXNz"),
            key="bearer",
            on_missing="reject",
            status=401,
            body=BEARER_REJECT,
            raw="dXNlcjpwYXNz",
        ),
        id="bearer-wrong-scheme-basic-401",
    ),
    pytest.param(
        IdCase(auth("Basic dXNlcjpwYXNz"), key="bearer", raw="dXNlcjpwYXNz"),
        id="bearer-wrong-scheme-basic-skip-unmetered",
    ),
    pytest.param(
        IdCase(
            auth("Bearer " + "t" * 100_000), key="bearer", charged=H("t" * 100_000), raw="t" * 100_000
        ),
        id="bearer-huge",
    ),
    pytest.param(
        IdCase(
            auth("Bearer sk-live-PLAIN1"),
            key="bearer",
            charged=H("sk-live-PLAIN1"),
            raw="sk-live-PLAIN1",
        ),
        id="bearer-plain-token-still-digested",
    ),
    pytest.param(
        IdCase(auth("bearer  sk-live-PLAIN2 "), key="bearer", charged=H("sk-live-PLAIN2")),
        id="bearer-lowercase-scheme-extra-spaces",
    ),
    pytest.param(
        IdCase(
            auth("Bearer sk-one", "Bearer sk-two"),
            key="bearer",
            status=400,
            body=ambiguous("bearer"),
            raw="sk-two",
        ),
        id="bearer-repeated-different-400",
    ),
    pytest.param(
        IdCase(
            (*auth("Bearer sk-live-PLAIN3"), (b"x-api-key", b"sk-live-PLAIN3")),
            key="header:x-api-key",
            charged=H("sk-live-PLAIN3"),
            raw="sk-live-PLAIN3",
        ),
        id="secret-header-x-api-key-digested",
    ),
    # -- query-string identity -----------------------------------------------------------------
    pytest.param(
        IdCase(query=b"user=alice&user=alice", key=QUERY, charged=R("alice")), id="query-repeat-same"
    ),
    pytest.param(
        IdCase(query=b"user=alice&user=%61lice", key=QUERY, charged=R("alice")),
        id="query-repeat-same-after-decoding",
    ),
    pytest.param(
        IdCase(query=b"user=alice&user=bob", key=QUERY, status=400, body=ambiguous(QUERY)),
        id="query-repeat-different-400",
    ),
    pytest.param(
        IdCase(query=b"user=%7Balice%7D", key=QUERY, charged=H("{alice}"), raw="{alice}"),
        id="query-encoded-braces",
    ),
    pytest.param(
        IdCase(
            query=b"user=%7Buser%3Ar%3Aalice%7D",
            key=QUERY,
            charged=H("{user:r:alice}"),
            raw="{user:r:alice}",
        ),
        id="query-encoded-hash-tag",
    ),
    pytest.param(IdCase(query=b"user=al+ice", key=QUERY, charged=H("al ice")), id="query-plus-is-space"),
    pytest.param(IdCase(query=b"user=al%00ice", key=QUERY, charged=H("al\x00ice")), id="query-nul"),
    pytest.param(IdCase(query=b"user=", key=QUERY), id="query-empty-skip-unmetered"),
    pytest.param(IdCase(query=b"User=alice", key=QUERY), id="query-name-is-case-sensitive"),
    pytest.param(
        IdCase(query=b"user=%E2%82%AC", key=QUERY, charged=H(b"\xe2\x82\xac")),
        id="query-percent-encoded-non-latin1",
    ),
    pytest.param(
        IdCase(query=b"user=%FF%FE", key=QUERY, charged=H(b"\xff\xfe")),
        id="query-percent-encoded-invalid-utf8",
    ),
]


@pytest.mark.parametrize("case", ID_CASES)
async def test_hostile_identity(
    make_harness: HarnessFactory, case: IdCase, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_harness((Rule("user", case.key, LIMIT, "1d", on_missing=case.on_missing),))  # type: ignore[arg-type]
    for token in case.seeded:
        await h.seed(token)
    before = {token: await h.state(token) for token in case.seeded}

    with caplog.at_level(logging.DEBUG, logger="budget_middleware"):
        sent = await h.request(case.headers, case.query)
        await settle_all(h.finalizer)

    assert sent.status == case.status
    if case.status != 200:
        assert case.body is not None
        assert_problem(sent, case.body)
        assert h.app_calls == 0
    else:
        assert sent.body == b"ok"
        assert h.app_calls == 1
    if case.charged is None:
        assert h.proxy.reserve_calls == []
        assert len(h.log) == 0
        if case.status == 200:
            assert sent.header("ratelimit") is None
            assert (h.handles[0].metered, h.handles[0].reason) == (False, "no rule applies")
    else:
        budget = h.budget(case.charged)
        assert h.proxy.reserve_calls == [(budget,)]
        seeded = SEED if case.charged in case.seeded else 0
        assert_admitted_headers(sent, "user", LIMIT_MICROS, LIMIT_MICROS - seeded - ESTIMATE)
        settlement, settled = h.log.only()
        assert [held.budget for held in settlement.holds] == [budget]
        assert (settlement.reason, settlement.actual, settled.outcome) == (
            "completed",
            CHARGE,
            "applied",
        )

    tags = {("user", t) for t in case.seeded}
    if case.charged is not None:
        tags.add(("user", case.charged))
    victims = {("user", t) for t in case.seeded if t != case.charged}
    await assert_redis_keys(h.ledger, tags, case.raw, victims=victims)

    for token in case.seeded:
        if token != case.charged:
            assert await h.state(token) == before[token], f"budget {token} changed"
    if case.charged is not None:
        seeded = SEED if case.charged in case.seeded else 0
        assert await h.state(case.charged) == (seeded + CHARGE, 0, 0)
    assert_not_leaked(case.raw, sent, caplog)


@pytest.mark.parametrize("query", [b"user=%E2%82%AC", b"user=%FF"])
async def test_a_client_cannot_bypass_a_fail_open_budget_with_an_encoded_query_id(
    make_harness: HarnessFactory, query: bytes
) -> None:
    """Fail-open is for an unreachable ledger, not for a client-chosen id: the request is metered."""
    h = make_harness((Rule("user", QUERY, LIMIT),), fail_mode="open")
    sent = await h.request(query_string=query)
    await settle_all(h.finalizer)
    assert sent.status == 200
    assert h.handles[0].metered is True, h.handles[0].reason
    assert len(h.proxy.reserve_calls) == 1
    (budget,) = h.proxy.reserve_calls[0]
    assert budget.entity.startswith("h:")
    assert await h.state(budget.entity) == (CHARGE, 0, 0)


async def test_ambiguous_identity_in_the_openai_format(make_harness: HarnessFactory) -> None:
    h = make_harness((Rule("user", "header:x-user", LIMIT),), error_format="openai")
    await h.seed(R("alice"))
    sent = await h.request(user("alice", "mallory"))
    assert sent.status == 400
    assert sent.header("content-type") == "application/json"
    assert sent.json() == {
        "error": {
            "message": "header:x-user was sent 2 times with different values",
            "type": "invalid_request_error",
            "param": None,
            "code": "budget_identity_ambiguous",
        }
    }
    assert h.app_calls == 0
    assert h.proxy.reserve_calls == []
    assert await h.state(R("alice")) == (SEED, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice"))}, None)


def two_rules(user_on_missing: str = "skip") -> tuple[Rule, ...]:
    return (
        Rule("user", "header:x-user", LIMIT, "1d", on_missing=user_on_missing),  # type: ignore[arg-type]
        Rule("key", "bearer", "3", "1d", on_missing="reject"),
    )


async def test_a_missing_credential_rejects_before_any_rule_is_reserved(
    make_harness: HarnessFactory,
) -> None:
    h = make_harness(two_rules())
    await h.seed(R("alice"))
    sent = await h.request(user("alice"))
    assert_problem(sent, missing("key", "bearer"))
    assert h.app_calls == 0
    assert h.proxy.reserve_calls == []
    assert await h.state(R("alice")) == (SEED, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice"))}, None)


async def test_an_ambiguous_second_rule_takes_no_hold_on_the_first(make_harness: HarnessFactory) -> None:
    h = make_harness(two_rules())
    await h.seed(R("alice"))
    sent = await h.request((*user("alice"), *auth("Bearer sk-a", "Bearer sk-b")))
    assert_problem(sent, ambiguous("bearer"))
    assert h.proxy.reserve_calls == []
    assert await h.state(R("alice")) == (SEED, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice"))}, None)


async def test_throwaway_user_ids_cannot_mint_budget_past_the_key_rule(
    make_harness: HarnessFactory,
) -> None:
    """Fresh per-user ids each get a fresh user budget, but the key rule caps them all together."""

    async def estimate_only(scope: Any, receive: Any, send: Any) -> None:  # reports nothing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    h = make_harness(two_rules(), app=estimate_only)
    token = "sk-live-TEAM"
    for i in (1, 2):
        sent = await h.request((*user(f"throwaway-{i}"), *auth(f"Bearer {token}")))
        assert sent.status == 200
        await settle_all(h.finalizer)
    sent = await h.request((*user("throwaway-3"), *auth(f"Bearer {token}")))
    assert sent.status == 429
    problem_body = sent.json()
    assert problem_body["violated-policies"] == ["key"]
    assert problem_body["budgets"][0]["rule"] == "key"
    assert problem_body["budgets"][0]["limit"] == "3"
    assert problem_body["budgets"][0]["remaining"] == "0"
    assert problem_body["budgets"][0]["retry_helps"] is False
    assert sent.header("retry-after") == str(problem_body["budgets"][0]["resets_in"])
    assert h.app_calls == 2
    await settle_all(h.finalizer)
    assert await h.state(H(token), "key") == (2 * ESTIMATE, 0, 0)
    assert await h.state(R("throwaway-1")) == (ESTIMATE, 0, 0)
    assert await h.state(R("throwaway-3")) == (0, 0, 0)
    assert token not in json.dumps(problem_body)


# =================================================================================================
# Charges: the Python API raises, the response header is logged and ignored
# =================================================================================================

BAD_AMOUNTS = [
    pytest.param(-1, id="negative-int"),
    pytest.param(Decimal("-0.5"), id="negative-decimal"),
    pytest.param(float("nan"), id="nan-float"),
    pytest.param(Decimal("NaN"), id="nan-decimal"),
    pytest.param(float("inf"), id="inf"),
    pytest.param("-inf", id="minus-inf-str"),
    pytest.param("1e999999", id="huge-1e999999"),
    pytest.param("99999999999", id="above-the-exact-range"),
    pytest.param("abc", id="malformed"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="none"),
]


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
@pytest.mark.parametrize("before", ["nothing", "a-valid-charge"])
async def test_a_bad_charge_raises_in_app_code_and_changes_nothing(
    make_harness: HarnessFactory, amount: Any, before: str
) -> None:
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        handle: RequestBudget = scope["state"]["budget"]
        if before == "a-valid-charge":
            handle.charge("0.25")
        snapshot = (handle.charged, handle.reported)
        try:
            handle.charge(amount)
        except ValueError as exc:
            raised.append(exc)
        assert (handle.charged, handle.reported) == snapshot
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    h = make_harness((Rule("user", "header:x-user", LIMIT),), app=app)
    await h.seed(R("bob"))
    sent = await h.request(user("alice"))
    await settle_all(h.finalizer)
    assert sent.status == 200
    assert_admitted_headers(sent, "user", LIMIT_MICROS, LIMIT_MICROS - ESTIMATE)
    assert len(raised) == 1
    assert "charge" in str(raised[0])
    expected = CHARGE if before == "a-valid-charge" else ESTIMATE
    settlement, settled = h.log.only()
    assert (settlement.reason, settlement.actual, settled.outcome) == ("completed", expected, "applied")
    assert await h.state(R("alice")) == (expected, 0, 0)
    assert await h.state(R("bob")) == (SEED, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice")), ("user", R("bob"))}, None)


BAD_HEADER_VALUES = [
    pytest.param(b"-1", id="negative"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b"inf", id="inf"),
    pytest.param(b"-Infinity", id="minus-infinity"),
    pytest.param(b"1e999999", id="huge"),
    pytest.param(b"abc", id="malformed"),
    pytest.param(b"1,5", id="comma"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe", id="non-ascii"),
]


@pytest.mark.parametrize("value", BAD_HEADER_VALUES)
@pytest.mark.parametrize("where", ["header", "header-after-charge", "trailer"])
async def test_a_bad_charge_header_is_logged_ignored_and_stripped(
    make_harness: HarnessFactory, caplog: pytest.LogCaptureFixture, value: bytes, where: str
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if where == "header-after-charge":
            scope["state"]["budget"].charge("0.25")
        if where == "trailer":
            await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
            await send({"type": "http.response.body", "body": b"ok"})
            await send({"type": "http.response.trailers", "headers": [(b"x-budget-charge", value)]})
            return
        headers = [(b"x-budget-charge", value), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    h = make_harness((Rule("user", "header:x-user", LIMIT),), app=app)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        sent = await h.request(user("alice"))
        await settle_all(h.finalizer)
    assert sent.status == 200
    assert sent.header("x-budget-charge") is None
    assert sent.header("content-type") == (None if where == "trailer" else "text/plain")
    assert all(k != b"x-budget-charge" for k, _ in sent.trailers)
    kind = "trailer" if where == "trailer" else "header"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"ignoring bad x-budget-charge {kind}" in w for w in warnings), warnings
    expected = CHARGE if where == "header-after-charge" else ESTIMATE
    settlement, _ = h.log.only()
    assert (settlement.reason, settlement.actual) == ("completed", expected)
    assert await h.state(R("alice")) == (expected, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice"))}, None)


async def test_a_client_sent_charge_header_is_not_a_report(make_harness: HarnessFactory) -> None:
    """Only the app's response reports a cost: a request header of that name changes nothing."""

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    h = make_harness((Rule("user", "header:x-user", LIMIT),), app=silent)
    sent = await h.request((*user("alice"), (b"x-budget-charge", b"0")))
    await settle_all(h.finalizer)
    assert sent.status == 200
    assert h.log.only()[0].actual == ESTIMATE
    assert await h.state(R("alice")) == (ESTIMATE, 0, 0)


# =================================================================================================
# Estimators that fail: closed -> 500 and nothing reserved; open -> the app runs unmetered
# =================================================================================================


def raising(request: Any) -> Any:
    raise RuntimeError("estimator internals: sk-live-SHOULD-NOT-LEAK")


async def raising_async(request: Any) -> Any:
    raise RuntimeError("estimator internals: sk-live-SHOULD-NOT-LEAK")


def returning(value: Any) -> Callable[[Any], Any]:
    def estimator(request: Any) -> Any:
        return value

    return estimator


BAD_ESTIMATORS = [
    pytest.param(raising, id="raises"),
    pytest.param(raising_async, id="async-raises"),
    pytest.param(returning(None), id="none"),
    pytest.param(returning("abc"), id="abc"),
    pytest.param(returning(float("nan")), id="nan"),
    pytest.param(returning(Decimal("NaN")), id="decimal-nan"),
    pytest.param(returning(-1), id="negative"),
    pytest.param(returning(True), id="true"),
    pytest.param(returning(False), id="false"),
    pytest.param(returning(float("inf")), id="inf"),
    pytest.param(returning("1e999999"), id="huge"),
    pytest.param(returning([1]), id="list"),
]


@pytest.mark.parametrize("estimator", BAD_ESTIMATORS)
@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_a_failing_estimator_changes_no_budget(
    make_harness: HarnessFactory,
    caplog: pytest.LogCaptureFixture,
    estimator: Callable[[Any], Any],
    fail_mode: str,
) -> None:
    h = make_harness((Rule("user", "header:x-user", LIMIT),), estimate=estimator, fail_mode=fail_mode)
    await h.seed(R("alice"))
    with caplog.at_level(logging.ERROR, logger="budget_middleware"):
        sent = await h.request(user("alice"))
        await settle_all(h.finalizer)
    if fail_mode == "closed":
        assert_problem(
            sent,
            problem(500, "Budget estimate failed", "the request's cost could not be estimated"),
        )
        assert h.app_calls == 0
    else:
        assert sent.status == 200
        assert sent.body == b"ok"
        assert sent.header("ratelimit") is None
        assert h.app_calls == 1
        assert (h.handles[0].metered, h.handles[0].reason) == (False, "estimate failed")
    assert b"SHOULD-NOT-LEAK" not in sent.body
    assert any(r.getMessage().startswith("budget: ") for r in caplog.records)
    assert h.proxy.reserve_calls == []
    assert len(h.log) == 0
    assert await h.state(R("alice")) == (SEED, 0, 0)
    await assert_redis_keys(h.ledger, {("user", R("alice"))}, None)


# =================================================================================================
# Configuration from BUDGET_* variables: the message names the variable and the bad value
# =================================================================================================

RULE = '{"name":"a","key":"header:x-user","limit":"1"}'

BAD_ENV = [
    pytest.param({"BUDGET_LEASE": "abc"}, "BUDGET_LEASE", "abc", id="lease-abc"),
    pytest.param({"BUDGET_LEASE": "-1"}, "BUDGET_LEASE", "-1", id="lease-negative"),
    pytest.param({"BUDGET_LEASE": "0"}, "BUDGET_LEASE", "'0'", id="lease-zero"),
    pytest.param({"BUDGET_LEASE": "nan"}, "BUDGET_LEASE", "nan", id="lease-nan"),
    pytest.param({"BUDGET_LEASE": "2d"}, "BUDGET_LEASE", "2d", id="lease-longer-than-the-horizon"),
    pytest.param({"BUDGET_HORIZON": "1s"}, "BUDGET_HORIZON", "1s", id="horizon-shorter-than-the-lease"),
    pytest.param(
        {"BUDGET_KEY": "header:x-user", "BUDGET_LIMIT": "NaN"}, "BUDGET_LIMIT", "NaN", id="limit-nan"
    ),
    pytest.param(
        {"BUDGET_KEY": "header:x-user", "BUDGET_LIMIT": "-5"}, "BUDGET_LIMIT", "-5", id="limit-neg"
    ),
    pytest.param(
        {"BUDGET_KEY": "header:x-user", "BUDGET_LIMIT": "1", "BUDGET_PERIOD": "fortnight"},
        "BUDGET_PERIOD",
        "fortnight",
        id="period-bad",
    ),
    pytest.param(
        {"BUDGET_KEY": "header:{x}", "BUDGET_LIMIT": "1"},
        "BUDGET_KEY",
        "header:{x}",
        id="key-bad-header",
    ),
    pytest.param({"BUDGET_FAIL_MODE": "maybe"}, "BUDGET_FAIL_MODE", "maybe", id="fail-mode"),
    pytest.param({"BUDGET_ESTIMATE": "1e999999"}, "BUDGET_ESTIMATE", "1e999999", id="estimate-huge"),
    pytest.param(
        {"BUDGET_ESTIMATE": "0.0000001"}, "BUDGET_ESTIMATE", "0.0000001", id="estimate-sub-micro"
    ),
    pytest.param({"BUDGET_MAX_HOLD": "abc"}, "BUDGET_MAX_HOLD", "abc", id="max-hold"),
    pytest.param({"BUDGET_SPAN_RAW_IDS": "maybe"}, "BUDGET_SPAN_RAW_IDS", "maybe", id="span-raw-ids"),
    pytest.param({"BUDGET_WAIT_REPLICAS": "-1"}, "BUDGET_WAIT_REPLICAS", "-1", id="wait-replicas"),
    pytest.param({"BUDGET_EXCLUDE": "health"}, "BUDGET_EXCLUDE", "health", id="exclude-no-slash"),
    pytest.param(
        {"BUDGET_CHARGE_HEADER": "x budget"}, "BUDGET_CHARGE_HEADER", "x budget", id="charge-header"
    ),
    pytest.param({"BUDGET_PREFIX": "bud{get}"}, "BUDGET_PREFIX", "bud{get}", id="prefix-brace"),
    pytest.param({"BUDGET_UNIT": "u$d"}, "BUDGET_UNIT", "u$d", id="unit"),
    pytest.param({"BUDGET_RULES": "[{"}, "BUDGET_RULES", "[{", id="rules-not-json"),
    pytest.param({"BUDGET_RULES": RULE}, "BUDGET_RULES", RULE, id="rules-not-a-list"),
    pytest.param({"BUDGET_RULES": "[1]"}, "BUDGET_RULES", "got 1", id="rules-item-not-an-object"),
    pytest.param(
        {"BUDGET_RULES": f"[{RULE},{RULE}]"}, "BUDGET_RULES", "duplicate rule names: a", id="dupes"
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a","key":"cookie:sid","limit":"1"}]'},
        "BUDGET_RULES",
        "cookie:sid",
        id="rules-unknown-key-source",
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a","key":"header:x","limit":"1","period":"fortnight"}]'},
        "BUDGET_RULES",
        "fortnight",
        id="rules-bad-period",
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a","key":"header:x","limit":"1","colour":"red"}]'},
        "BUDGET_RULES",
        "colour",
        id="rules-unknown-field",
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a{b}","key":"header:x","limit":"1"}]'},
        "BUDGET_RULES",
        "a{b}",
        id="rules-name-with-brace",
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a","key":"header:x","limit":"1","on_missing":"maybe"}]'},
        "BUDGET_RULES",
        "maybe",
        id="rules-on-missing",
    ),
    pytest.param(
        {"BUDGET_RULES": '[{"name":"a","key":"header:x","limit":"NaN"}]'},
        "BUDGET_RULES",
        "NaN",
        id="rules-limit-nan",
    ),
    pytest.param(
        {"BUDGET_REDIS_URL": "http://localhost:6379/0"},
        "BUDGET_REDIS_URL",
        "http://localhost",
        id="url-http",
    ),
]


@pytest.mark.parametrize(("environ", "variable", "bad"), BAD_ENV)
def test_a_malformed_variable_names_itself_and_its_value(
    environ: dict[str, str], variable: str, bad: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        BudgetConfig.from_env(environ=environ)
    message = str(caught.value)
    assert variable in message
    assert bad in message


PASSWORD = "hunter2-S3CRET"

SECRET_URLS = [
    pytest.param({"BUDGET_REDIS_URL": f"http://user:{PASSWORD}@redis:6379/0"}, id="http-with-userinfo"),
    pytest.param(
        {"BUDGET_REDIS_URL": f"http://redis:6379/0?password={PASSWORD}"}, id="http-query-password"
    ),
    pytest.param({"BUDGET_REDIS_URL": f"tcp://:{PASSWORD}@redis:6379"}, id="tcp-password-only"),
    pytest.param({"BUDGET_REDIS_URL": f"default:{PASSWORD}@redis:6379"}, id="scheme-less-user-password"),
    pytest.param({"BUDGET_REDIS_URL": f":{PASSWORD}@redis:6379"}, id="scheme-less-password"),
]


@pytest.mark.parametrize("environ", SECRET_URLS)
def test_a_bad_redis_url_is_named_without_its_password(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        BudgetConfig.from_env(environ=environ)
    message = str(caught.value)
    assert "BUDGET_REDIS_URL" in message
    assert PASSWORD not in message


def test_a_good_redis_url_password_stays_out_of_other_errors_and_the_startup_line() -> None:
    url = f"redis://default:{PASSWORD}@redis:6379/0"
    with pytest.raises(ConfigError) as caught:
        BudgetConfig.from_env(
            environ={"BUDGET_REDIS_URL": url, "BUDGET_SECRET": "k-S3CRET", "BUDGET_LEASE": "abc"}
        )
    assert PASSWORD not in str(caught.value)
    assert "k-S3CRET" not in str(caught.value)
    config = BudgetConfig.from_env(
        environ={"BUDGET_REDIS_URL": url, "BUDGET_SECRET": "k-S3CRET", "BUDGET_RULES": f"[{RULE}]"}
    )
    described = config.describe()
    assert PASSWORD not in described
    assert "k-S3CRET" not in described
    assert "redis://***@redis:6379/0" in described
    assert PASSWORD not in repr(RedisLedger(url))


def test_the_config_repr_hides_the_redis_password_and_the_secret() -> None:
    """``repr`` is what tracebacks with locals, debuggers and error trackers print."""
    config = BudgetConfig(redis_url=f"redis://default:{PASSWORD}@redis:6379/0", secret="k-S3CRET")
    assert PASSWORD not in repr(config)
    assert "k-S3CRET" not in repr(config)


@pytest.mark.parametrize(
    ("rule", "bad"),
    [
        pytest.param({"name": "a{b}", "key": "header:x", "limit": 1}, "a{b}", id="name-brace"),
        pytest.param({"name": "a:b", "key": "header:x", "limit": 1}, "a:b", id="name-colon"),
        pytest.param({"name": "x" * 65, "key": "header:x", "limit": 1}, "x" * 65, id="name-too-long"),
        pytest.param({"name": "a", "key": "header:x\r\ny", "limit": 1}, "header:x", id="header-crlf"),
        pytest.param({"name": "a", "key": "query:" + "q" * 129, "limit": 1}, "q" * 129, id="query-long"),
        pytest.param({"name": "a", "key": "bearer:x", "limit": 1}, "bearer:x", id="bearer-with-name"),
    ],
)
def test_rule_names_and_sources_are_validated_in_python(rule: dict[str, Any], bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        Rule.from_dict(rule)
