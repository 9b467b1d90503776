"""Who a request is charged to: each rule's entity id, turned into the budget it names.

A rule's id comes from the ASGI scope (a header, the query, the bearer token, the client address,
the authenticated user, a constant), from a ``key`` callable, or from the middleware's ``identify``
callable. Budgets of recent ids are cached per rule, so a returning client costs one header scan and
one dict lookup. Callables may read the request's body: what they read is recorded and replayed to
the app unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from .budgets import Budget
from .config import Rule
from .identity import AmbiguousEntity, EntityHasher, header_value, plain_id
from .responses import send_ambiguous_entity, send_missing_entity

__all__ = [
    "ANONYMOUS",
    "Exclusions",
    "Identify",
    "MissingEntity",
    "Resolver",
    "recording_request",
    "refuse_identity",
    "replaying",
]

Identify = Callable[[Request], "Awaitable[Mapping[str, str | None]] | Mapping[str, str | None]"]
Wanted = list[tuple[Rule, Budget]]

ANONYMOUS = "anonymous"  # outside the r:/h: namespaces, so no client id can collide with it
# Budgets kept per rule for recent entity ids, and the longest id kept: 4096 x 128 bytes per rule.
BUDGET_CACHE = 4096
CACHED_ID_LENGTH = 128


class MissingEntity(Exception):
    """A rule with ``on_missing="reject"`` found no id in the request."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(f"rule {rule.name!r} needs an entity id from {rule.describe_source()}")
        self.rule = rule


class Exclusions:
    """``BUDGET_EXCLUDE``: path prefixes, relative to ``root_path``, that pass unmetered."""

    __slots__ = ("paths",)

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = tuple(p.rstrip("/") for p in paths)

    def match(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return any(path == p or path.startswith(p + "/") or not p for p in self.paths)


async def refuse_identity(send: Send, exc: AmbiguousEntity | MissingEntity, error_format: str) -> None:
    """401 for a rule that must have an id and found none; 400 for an id given twice, differently."""
    if isinstance(exc, MissingEntity):
        source = exc.rule.describe_source()
        await send_missing_entity(send, exc.rule.name, source, error_format=error_format)
    else:
        await send_ambiguous_entity(send, str(exc), error_format=error_format)


class Resolver:
    """Resolves the budgets of a request, one per rule that applies, in the rules' order."""

    def __init__(self, rules: tuple[Rule, ...], hasher: EntityHasher, identify: Identify | None) -> None:
        self._rules = rules
        self._hasher = hasher
        self._identify = identify
        # Whether resolving needs a Request (a callable looks at it), or the scope alone will do.
        self.needs_request = identify is not None or any(r.source is None for r in rules)
        # An id from identify or a key callable stands where the rule's source would: it is a
        # credential if that source is.
        self._secret = tuple(r.secret or (r.source is not None and r.source.secret) for r in rules)
        self._budgets: tuple[dict[str | bytes | None, Budget], ...] = tuple({} for _ in rules)
        # ... and the same budgets by a header's bytes as they arrive, for a rule keyed on a header
        # that is not a credential: a returning client's id is then not even decoded.
        self._header_budgets: tuple[dict[bytes, Budget], ...] = tuple({} for _ in rules)
        self._header_names = tuple(
            r.source.name.encode("latin-1")
            if r.source is not None and r.source.kind == "header"
            else None
            for r in rules
        )

    def from_scope(self, scope: Scope) -> Wanted:
        """The budgets of a request whose ids all come from the scope: no awaits."""
        wanted: Wanted = []
        for i, rule in enumerate(self._rules):
            assert rule.source is not None
            header = self._header_names[i]
            if header is None:
                self._want(wanted, i, rule.source.extract(scope))
                continue
            value = header_value(scope, header, rule.source)
            if value is None:
                self._want(wanted, i, None)
            elif self._secret[i]:
                wanted.append((rule, self._budget(i, plain_id(value))))
            else:
                budget = self._header_budgets[i].get(value)
                if budget is None:
                    budget = self._budget(i, plain_id(value))
                    _keep(self._header_budgets[i], value, budget)
                wanted.append((rule, budget))
        return wanted

    async def resolve(self, scope: Scope, request: Request) -> Wanted:
        """The budgets of a request, asking ``identify`` and ``key`` callables."""
        overrides: Mapping[str, str | None] = {}
        if self._identify is not None:
            found = self._identify(request)
            overrides = await found if inspect.isawaitable(found) else found
        wanted: Wanted = []
        for i, rule in enumerate(self._rules):
            raw: str | bytes | None
            if rule.name in overrides:
                raw = overrides[rule.name]
            elif rule.source is not None:
                raw = rule.source.extract(scope)
            else:
                assert callable(rule.key)
                got = rule.key(request)
                raw = await got if inspect.isawaitable(got) else got
            self._want(wanted, i, raw)
        return wanted

    def _want(self, wanted: Wanted, i: int, raw: str | bytes | None) -> None:
        """Adds rule ``i``'s budget for the id ``raw``; without an id, as ``on_missing`` says."""
        rule = self._rules[i]
        if raw is None or raw == "":
            if rule.on_missing == "skip":
                return
            if rule.on_missing == "reject":
                raise MissingEntity(rule)
            raw = None
        wanted.append((rule, self._budget(i, raw)))

    def _budget(self, i: int, raw: str | bytes | None) -> Budget:
        """The budget of rule ``i`` for entity id ``raw`` (None: anonymous).

        A credential is never a cache key: its budget is looked up by its digest. Long ids are not
        kept, so the cache stays small whatever clients send.
        """
        cache = self._budgets[i]
        token: str | None = None
        if raw is not None and self._secret[i]:
            token = self._hasher.token(raw, secret=True)
        key = raw if token is None else token
        budget = cache.get(key)
        if budget is None:
            if token is None:
                token = ANONYMOUS if raw is None else self._hasher.token(raw)
            rule = self._rules[i]
            budget = Budget(rule.name, token, rule.period_ms)
            _keep(cache, key, budget)
        return budget


def _keep(cache: dict[Any, Budget], key: str | bytes | None, budget: Budget) -> None:
    """Keep ``budget`` under ``key`` unless the key is long; a full cache is emptied first."""
    if key is None or len(key) <= CACHED_ID_LENGTH:
        if len(cache) >= BUDGET_CACHE:
            cache.clear()
        cache[key] = budget


def recording_request(scope: Scope, receive: Receive, body_read: list[Message]) -> Request:
    """A ``Request`` for an estimator or identify callable, which may read the body: what they
    read is recorded in ``body_read``, to be replayed to the app."""

    async def receive_recording_body() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            body_read.append(message)
        return message

    return Request(scope, receive_recording_body)


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that first returns the body messages a hook already read."""
    queue = list(messages)

    async def receive_replaying_body() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return receive_replaying_body
