"""``BudgetMiddleware``: pure ASGI; reserve on entry, settle exactly once on every exit path.

The request's life (DESIGN.md section 6): resolve the entity of each rule, estimate, reserve all rules
at once; on rejection answer 429 without calling the app; otherwise call the app with a ``receive``
that sees ``http.disconnect`` and a ``send`` that adds RateLimit headers and sees the final body; and
in ``finally``, whatever happened, hand one settlement to the finalizer without awaiting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Status, StatusCode
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .amounts import format_micros
from .budgets import Budget
from .config import BudgetConfig, Rule
from .costs import EstimateError, Estimator, estimate_micros
from .finalizer import Finalizer, Hold
from .handle import RequestBudget, charge_micros, get_reservation
from .identity import AmbiguousEntity, EntityHasher, KeySource, header_value, plain_id
from .journal import Journal
from .ledger import (
    HeldBudget,
    HoldRequest,
    Ledger,
    LedgerError,
    MemoryLedger,
    Rejection,
    Reservation,
    Settlement,
    new_reservation_id,
    redis_ledger_from_url,
)
from .ledger._types import fast_path
from .responses import (
    Headers,
    admitted_headers,
    headers_from_head,
    hold_head,
    send_missing_entity,
    send_problem,
    send_rejection,
    send_unavailable,
)
from .telemetry import (
    ATTR,
    EVENT_HOLD_EXPIRED,
    INVALID_SPAN,
    SPAN_RESERVE,
    instruments,
    spans_recorded,
    telemetry_off,
    tracer,
)

__all__ = ["BudgetMiddleware", "RequestBudget", "get_reservation"]

logger = logging.getLogger("budget_middleware")

Identify = Callable[[Request], "Awaitable[Mapping[str, str | None]] | Mapping[str, str | None]"]
_ANONYMOUS = "anonymous"  # outside the r:/h: namespaces, so no client id can collide with it


def make_ledger(config: BudgetConfig) -> Ledger:
    if config.redis_url:
        return redis_ledger_from_url(
            config.redis_url,
            prefix=config.prefix,
            horizon_ms=config.horizon_ms,
            wait_replicas=config.wait_replicas,
        )
    return MemoryLedger(horizon_ms=config.horizon_ms)


def _several_workers() -> bool:
    try:
        if int(os.environ.get("WEB_CONCURRENCY", "1")) > 1:
            return True
    except ValueError:
        pass
    return multiprocessing.parent_process() is not None or "gunicorn" in os.environ.get(
        "SERVER_SOFTWARE", ""
    )


class BudgetMiddleware:
    """Hard spend budgets for an ASGI app. See the README for configuration.

    ``app.add_middleware(BudgetMiddleware)`` reads ``BUDGET_*`` from the environment; or pass a
    ``config``, a ``ledger``, an ``estimate`` callable and an ``identify`` callable (returning
    ``{rule name: entity id}`` after authentication) explicitly.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: BudgetConfig | None = None,
        *,
        ledger: Ledger | None = None,
        estimate: Estimator | None = None,
        identify: Identify | None = None,
        finalizer: Finalizer | None = None,
    ) -> None:
        self.app = app
        self.config = config if config is not None else BudgetConfig.from_env()
        self.ledger = ledger if ledger is not None else make_ledger(self.config)
        self.hasher = EntityHasher(self.config.secret)
        self.finalizer = finalizer or Finalizer(
            self.ledger,
            lease_ms=self.config.lease_ms,
            timeout_ms=self.config.timeout_ms,
            hasher=self.hasher,
            span_raw_ids=self.config.span_raw_ids,
            journal=Journal(self.config.journal_dir) if self.config.journal_dir else None,
            max_pending=self.config.max_pending,
        )
        # A ledger that reserves synchronously (memory) is called without a timeout or an await.
        self._reserve_now: Callable[[str, list[HoldRequest], int], Reservation | Rejection] | None = (
            getattr(self.ledger, "reserve_now", None)
        )
        # ... and one that also reserves and settles one hold without the request and result
        # objects (memory) serves one-rule requests on a lean path while no telemetry SDK is
        # installed: see ``__call__``.
        self._reserve_hold: Callable[[str, Budget, int, int, int, int], Any] | None = (
            getattr(self.ledger, "reserve_hold", None)
            if self._reserve_now is not None
            and fast_path(self.ledger, "reserve_hold", "reserve_now")
            and self.finalizer.settles_holds
            and self.finalizer.ledger is self.ledger
            else None
        )
        # The ledger's clock, whose one read makes the lean path's reservation id and its reserve.
        self._ledger_now: Callable[[], int] | None = (
            getattr(self.ledger, "now", None) if self._reserve_hold is not None else None
        )
        self._estimator = estimate
        self._identify = identify
        config = self.config
        self._rules = config.rules
        self._needs_request = (
            estimate is not None or identify is not None or any(r.source is None for r in self._rules)
        )
        # Facts the request path would otherwise work out on every request. The config is frozen
        # and the rules are fixed for the middleware's life, so none of this goes stale.
        self._rule_names = tuple(r.name for r in self._rules)
        # An id from identify or a key callable stands where the rule's source would: it is a
        # credential if that source is.
        self._secret = tuple(r.secret or (r.source is not None and r.source.secret) for r in self._rules)
        self._budgets: tuple[dict[str | bytes | None, Budget], ...] = tuple({} for _ in self._rules)
        # ... and the same budgets by a header's bytes as they arrive, for a rule keyed on a header
        # that is not a credential: a returning client's id is then not even decoded.
        self._header_budgets: tuple[dict[bytes, Budget], ...] = tuple({} for _ in self._rules)
        # The RateLimit parts of the lean path, per rule name: (limit, policy header, start).
        self._hold_heads: dict[str, tuple[int, tuple[bytes, bytes], bytes]] = {}
        self._header_names = tuple(
            r.source.name.encode("latin-1")
            if r.source is not None and r.source.kind == "header"
            else None
            for r in self._rules
        )
        self._one_header: tuple[Rule, bytes, KeySource] | None = None
        if len(self._rules) == 1 and not self._secret[0]:
            first, header = self._rules[0], self._header_names[0]
            if header is not None and first.source is not None:
                self._one_header = (first, header, first.source)
        self._fixed_estimate = (
            min(config.estimate, config.max_hold) if config.max_hold is not None else config.estimate
        )
        self._charges_estimate = {
            "completed": True,
            "disconnected": config.charge_on_disconnect == "estimate",
            "cancelled": config.charge_on_cancel == "estimate",
            "error": config.charge_on_error == "estimate",
        }
        self._charge_header = config.charge_header.encode()
        self._exclude = tuple(p.rstrip("/") for p in config.exclude)
        self._lease_ms = config.lease_ms
        self._timeout_s = config.timeout_ms / 1000
        self._warned_workers = False

    def _excluded(self, scope: Scope) -> bool:
        if not self._exclude:
            return False
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return any(path == p or path.startswith(p + "/") or not p for p in self._exclude)

    # -- lifespan: the finalizer lives in a task group around the app's lifespan ----------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        drained = False
        closed = False
        finalizer = self.finalizer
        drain_s = self.config.drain_timeout_ms / 1000

        async def drain_and_close() -> None:
            nonlocal drained, closed
            if started and not drained:
                drained = True
                await finalizer.drain(drain_s)
            if not closed:
                closed = True
                with anyio.move_on_after(2):
                    await self.ledger.aclose()

        async with anyio.create_task_group() as tg:

            async def receive_managing_finalizer() -> Message:
                nonlocal started, drained
                message = await receive()
                if message["type"] == "lifespan.startup" and not started:
                    await tg.start(finalizer.run)
                    started = True
                    self._log_startup()
                elif message["type"] == "lifespan.shutdown" and started and not drained:
                    # Requests have ended (or been cancelled) by now: apply their settlements
                    # before the app's own shutdown runs.
                    drained = True
                    await finalizer.drain(drain_s)
                return message

            async def send_closing_ledger(message: Message) -> None:
                # Some servers cancel the lifespan task as soon as shutdown completes, so finish
                # our own shutdown first.
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    await drain_and_close()
                await send(message)

            try:
                await self.app(scope, receive_managing_finalizer, send_closing_ledger)
            finally:
                if not (drained and closed):
                    with anyio.CancelScope(shield=True):
                        await drain_and_close()
                tg.cancel_scope.cancel()

    def _log_startup(self) -> None:
        logger.info("budget: %s", self.config.describe())
        if isinstance(self.ledger, MemoryLedger) and _several_workers():
            logger.warning(
                "budget: the memory ledger is per process and several workers seem to run here; "
                "each enforces the whole limit, so N workers admit up to N times each budget. "
                "Set BUDGET_REDIS_URL to share budgets."
            )

    # -- http, and the dispatch --------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:  # websockets and anything else pass through unmetered
                await self.app(scope, receive, send)
            return
        # The request's life is written out here rather than in a method awaited from here: one
        # coroutine less on every request.
        state: dict[str, Any] | None = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        if not self._rules or (self._exclude and self._excluded(scope)):
            state["budget"] = RequestBudget(metered=False, reason="excluded")
            await self.app(scope, receive, send)
            return
        if not self.finalizer.running:
            self.finalizer.ensure_running()
        config = self.config
        request = None
        if self._needs_request:
            body_read: list[Message] = []
            request = _recording_request(scope, receive, body_read)

        # 1. Who is charged, under which rule.
        try:
            if request is None:
                wanted = self._resolve_from_scope(scope)
            else:
                wanted = await self._resolve(scope, request)
        except AmbiguousEntity as exc:
            await send_problem(
                send,
                400,
                "Ambiguous budget identity",
                str(exc),
                error_format=config.error_format,
                code="budget_identity_ambiguous",
            )
            return
        except _Missing as missing:
            await send_missing_entity(
                send, missing.rule.name, missing.rule.describe_source(), error_format=config.error_format
            )
            return
        except Exception as exc:
            logger.exception("budget: identify failed")
            await self._refuse_or_bypass(scope, receive, send, state, f"identify failed: {exc}")
            return
        if not wanted:
            state["budget"] = RequestBudget(metered=False, reason="no rule applies")
            await self.app(scope, receive, send)
            return

        # 2. How much to hold.
        if self._estimator is None or request is None:
            estimate = self._fixed_estimate
        else:
            try:
                estimate = await estimate_micros(
                    self._estimator, request, config.estimate, config.max_hold
                )
            except EstimateError as exc:
                logger.error("budget: %s", exc)
                with tracer.start_as_current_span(SPAN_RESERVE) as span:
                    span.set_attribute(ATTR.OUTCOME, "error")
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                if config.fail_mode == "open":
                    state["budget"] = RequestBudget(metered=False, reason="estimate failed")
                    await self.app(scope, receive, send)
                    return
                await send_problem(
                    send,
                    500,
                    "Budget estimate failed",
                    "the request's cost could not be estimated",
                    error_format=config.error_format,
                    code="budget_estimate_failed",
                )
                return

        if request is not None and body_read:
            receive = _replaying(body_read, receive)

        # 3. Reserve every rule at once.
        reservation: Reservation | None = None
        hold: Hold | None = None
        span_context: object = INVALID_SPAN_CONTEXT
        if self._reserve_hold is not None and len(wanted) == 1 and telemetry_off(tracer):
            # The lean path: then the reserve span and the metrics would do nothing, and neither
            # the HoldRequest nor the Reservation is needed (see MemoryLedger.reserve_hold). The
            # id and the reserve share one read of the ledger's clock.
            assert self._ledger_now is not None
            now = self._ledger_now()
            rid = new_reservation_id(now)
            rule, budget = wanted[0]
            lease_ms = self._lease_ms
            got = self._reserve_hold(rid, budget, rule.limit_micros, estimate, lease_ms, now)
            if isinstance(got, Rejection):
                rejection: Rejection | None = got
            else:
                rejection = None
                hold = (rid, budget, estimate, lease_ms, got)
                # hold_headers, with the parts that depend on the rule and its limit kept per
                # rule name. ``got`` is (window, epoch, limit, remaining, reset_ms, ..., now).
                limit = got[2]
                head = self._hold_heads.get(budget.rule)
                if head is None or head[0] != limit:
                    head = (limit, *hold_head(budget.rule, limit, budget.period_ms))
                    self._hold_heads[budget.rule] = head
                headers = headers_from_head(head[1], head[2], got[3], got[4], got[8])
                if self.finalizer.on_settled is not None:  # it sees the request's trace id
                    span_context = trace.get_current_span().get_span_context()
        else:
            rid = new_reservation_id()
            requests = []
            for rule, budget in wanted:
                requests.append(HoldRequest(budget, rule.limit_micros, estimate))
            result = await self._reserve(rid, requests, estimate)
            if result is None:  # the ledger did not answer
                if config.fail_mode == "open":
                    instruments().reservations.add(1, _OUTCOME_ATTRS["bypassed"])
                    state["budget"] = RequestBudget(metered=False, reason="ledger unavailable")
                    await self.app(scope, receive, send)
                else:
                    await send_unavailable(
                        send, "the budget ledger is unavailable", error_format=config.error_format
                    )
                return
            reserved, span_context = result
            if isinstance(reserved, Reservation):
                rejection = None
                reservation = reserved
                headers = admitted_headers(reserved.holds, reserved.now_ms)
            else:
                rejection = reserved
        if rejection is not None:
            state["budget"] = RequestBudget(metered=False, reason="rejected")
            await send_rejection(
                send,
                rejection.violations,
                unit=config.unit,
                error_format=config.error_format,
                hold_retry_after_s=config.hold_retry_after_s,
            )
            return

        # 4. Run the app, watching what it sends and whether the client leaves.
        if hold is not None:
            self.finalizer.track_hold(hold)
        else:
            assert reservation is not None
            self.finalizer.track(reservation)
        names = (
            self._rule_names
            if len(wanted) == len(self._rules)
            else tuple(rule.name for rule, _ in wanted)
        )
        watch = _MeteredRequest(receive, send, headers, self._charge_header, rid, names, estimate)
        state["budget"] = watch
        failure = ""
        try:
            await self.app(scope, watch.receive_watching_disconnect, watch.send_with_budget_headers)
        except Exception:
            failure = "error"
            raise
        except BaseException:
            failure = "cancelled"
            raise
        finally:
            # Completed or disconnected, as the response went; else as the app ended (an app that
            # returned without finishing its response is an error).
            reason = watch.ended or failure or "error"
            # The actual cost; the handle takes no charge from now on.
            if watch._reported or watch.header_reported:
                actual = watch._charged + watch.header_charged
            elif watch.status >= 400:
                actual = 0
            else:
                actual = estimate if self._charges_estimate[reason] else 0
            watch._closed = True
            # The handle stays in the scope's state: it lets go of the server's callables, or
            # scope -> state -> handle -> send -> connection -> scope would be a reference cycle
            # that keeps every finished connection alive until the cyclic collector runs.
            watch._receive = _receive_after_end
            watch._send = _send_after_end
            if actual > estimate:
                logger.info(
                    "budget: %s overran its estimate (%s > %s); charged in full",
                    rid,
                    format_micros(actual),
                    format_micros(estimate),
                )
            trace_id = (
                ""
                if span_context is INVALID_SPAN_CONTEXT
                or not isinstance(span_context, trace.SpanContext)
                or not span_context.is_valid
                else format(span_context.trace_id, "032x")
            )
            # Synchronous, no await: cannot be cancelled.
            if hold is not None:
                self.finalizer.settle_hold(hold, actual, reason, span_context, trace_id)
            else:
                assert reservation is not None
                self.finalizer.submit(
                    Settlement(
                        rid,
                        reservation.holds,
                        actual,
                        reason,
                        estimate,
                        context=span_context,
                        trace_id=trace_id,
                    )
                )

    def _resolve_from_scope(self, scope: Scope) -> list[tuple[Rule, Budget]]:
        """``_resolve`` for rules whose ids all come from the scope: no awaits, so no coroutine.
        A header id whose budget is cached costs one header scan and one dict lookup."""
        one = self._one_header
        if one is not None:  # one rule, a header that is not a credential: the common case
            rule, name, source = one
            value = header_value(scope, name, source)
            if value is not None:
                budget = self._header_budgets[0].get(value)
                if budget is not None:
                    return [(rule, budget)]
        wanted: list[tuple[Rule, Budget]] = []
        for i, rule in enumerate(self._rules):
            assert rule.source is not None
            header = self._header_names[i]
            if header is None:
                self._want(wanted, i, rule, rule.source.extract(scope))
                continue
            value = header_value(scope, header, rule.source)
            if value is None:
                self._want(wanted, i, rule, None)
                continue
            secret = self._secret[i]
            if not secret:
                budget = self._header_budgets[i].get(value)
                if budget is not None:
                    wanted.append((rule, budget))
                    continue
            budget = self._budget(i, plain_id(value))
            if not secret:
                _keep(self._header_budgets[i], value, budget)
            wanted.append((rule, budget))
        return wanted

    async def _resolve(self, scope: Scope, request: Request | None) -> list[tuple[Rule, Budget]]:
        overrides: Mapping[str, str | None] = {}
        if self._identify is not None:
            assert request is not None
            found = self._identify(request)
            overrides = await found if inspect.isawaitable(found) else found
        wanted: list[tuple[Rule, Budget]] = []
        for i, rule in enumerate(self._rules):
            raw: str | bytes | None
            if rule.name in overrides:
                raw = overrides[rule.name]
            elif rule.source is not None:
                raw = rule.source.extract(scope)
            else:
                assert request is not None
                assert callable(rule.key)
                got = rule.key(request)
                raw = await got if inspect.isawaitable(got) else got
            self._want(wanted, i, rule, raw)
        return wanted

    def _want(
        self, wanted: list[tuple[Rule, Budget]], i: int, rule: Rule, raw: str | bytes | None
    ) -> None:
        """Adds rule ``i``'s budget for the id ``raw``; without an id, as ``on_missing`` says."""
        if raw is None or raw == "":
            if rule.on_missing == "skip":
                return
            if rule.on_missing == "reject":
                raise _Missing(rule)
            raw = None
        wanted.append((rule, self._budget(i, raw)))

    def _budget(self, i: int, raw: str | bytes | None) -> Budget:
        """The budget of rule ``i`` for entity id ``raw`` (None: anonymous).

        Budgets of recent ids are kept, so a returning client costs one dict lookup instead of a
        regex match (or an HMAC) and a new ``Budget``. A credential is never a key: its budget is
        looked up by its digest. Long ids are not kept, so the cache stays small whatever clients
        send.
        """
        cache = self._budgets[i]
        token: str | None = None
        if raw is not None and self._secret[i]:
            token = self.hasher.token(raw, secret=True)
        key = raw if token is None else token
        budget = cache.get(key)
        if budget is None:
            if token is None:
                token = _ANONYMOUS if raw is None else self.hasher.token(raw)
            rule = self._rules[i]
            budget = Budget(rule.name, token, rule.period_ms)
            _keep(cache, key, budget)
        return budget

    async def _reserve(
        self, rid: str, requests: list[HoldRequest], estimate: int
    ) -> tuple[Any, trace.SpanContext] | None:
        """Reserve with a timeout, inside a ``budget.reserve`` span; None if the ledger failed.

        The span is a child of the request's span but is not made current: nothing inside needs
        it, and attaching a context costs more than the memory ledger's whole reserve.
        """
        # Without a tracer provider the span is the invalid one, whose calls below do nothing.
        span = tracer.start_span(SPAN_RESERVE) if spans_recorded(tracer) else INVALID_SPAN
        recording = span is not INVALID_SPAN and span.is_recording()
        if recording:
            span.set_attributes(
                {
                    ATTR.RESERVATION_ID: rid,
                    ATTR.RULES: [r.budget.rule for r in requests],
                    ATTR.ENTITIES: [self._span_entity(r.budget.entity) for r in requests],
                    ATTR.ESTIMATE: estimate,
                    ATTR.UNIT: self.config.unit,
                }
            )
        try:
            if self._reserve_now is not None:  # memory: cannot block, so no timeout to arm
                result = self._reserve_now(rid, requests, self._lease_ms)
            else:
                async with asyncio.timeout(self._timeout_s):
                    result = await self.ledger.reserve(rid, requests, self._lease_ms)
        except (LedgerError, TimeoutError, OSError) as exc:
            # The reserve may have run on the server: release whatever it may have held.
            self._release_unknown(rid, requests, "unavailable")
            span.set_attribute(ATTR.OUTCOME, "unavailable")
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            instruments().reservations.add(1, _OUTCOME_ATTRS["unavailable"])
            logger.warning("budget: reserve failed (%s: %s)", type(exc).__name__, exc)
            return None
        except BaseException:
            self._release_unknown(rid, requests, "cancelled")
            span.set_attribute(ATTR.OUTCOME, "cancelled")
            span.end()
            raise
        inst = instruments()
        if result.expired_ids:
            inst.holds_expired.add(len(result.expired_ids))
            for expired in result.expired_ids:
                span.add_event(EVENT_HOLD_EXPIRED, {ATTR.RESERVATION_ID: expired})
        outcome = "admitted" if result.admitted else "rejected"
        inst.reservations.add(1, _OUTCOME_ATTRS[outcome])
        if span is INVALID_SPAN:  # nothing to record or end
            # The request's own context, valid when an upstream trace was propagated (API-only
            # instrumentation): the settlement still carries the request's trace id.
            return result, trace.get_current_span().get_span_context()
        if recording:
            span.set_attribute(ATTR.OUTCOME, outcome)
            span.set_attribute(ATTR.PURGED, result.purged)
            if isinstance(result, Reservation):
                span.set_attribute(ATTR.LIMITS, [h.limit for h in result.holds])
                span.set_attribute(ATTR.REMAINING, [h.remaining for h in result.holds])
            else:
                span.set_attribute(ATTR.VIOLATED, [v.budget.rule for v in result.violations])
                span.set_attribute(ATTR.LIMITS, [v.limit for v in result.violations])
                span.set_attribute(ATTR.REMAINING, [v.remaining for v in result.violations])
        span.end()
        return result, span.get_span_context()

    def _span_entity(self, token: str) -> str:
        return token if self.config.span_raw_ids else self.hasher.for_span(token)

    def _release_unknown(self, rid: str, requests: list[HoldRequest], reason: str) -> None:
        holds = tuple(HeldBudget(r.budget, r.amount, -1, "", r.limit, 0, None) for r in requests)
        estimate = requests[0].amount if requests else 0
        self.finalizer.submit(Settlement(rid, holds, 0, f"release-{reason}", estimate))

    async def _refuse_or_bypass(
        self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any], why: str
    ) -> None:
        if self.config.fail_mode == "open":
            state["budget"] = RequestBudget(metered=False, reason=why)
            await self.app(scope, receive, send)
            return
        await send_problem(
            send,
            500,
            "Budget identity lookup failed",
            "the request's budget identity could not be resolved",
            error_format=self.config.error_format,
            code="budget_identify_failed",
        )


class _MeteredRequest(RequestBudget):
    """The budget handle of one admitted request, and what its response does: its status, the
    cost it reports in the charge header or trailer, whether its final message went out, and
    whether the client left.

    One small object with two bound methods, made on every metered request: cheaper than a handle
    and closures (with their cells) beside it, and it keeps all per-request state out of the
    middleware instance. The handle's own fields are set here as ``RequestBudget`` sets them.
    """

    __slots__ = (
        "_budget_headers",
        "_charge_header",
        "_receive",
        "_send",
        "ended",
        "expect_trailers",
        "header_charged",
        "header_reported",
        "status",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        budget_headers: Headers,
        charge_header: bytes,
        rid: str,
        rules: tuple[str, ...],
        estimate: int,
    ) -> None:
        self.metered = True
        self.reason = ""
        self.reservation_id = rid
        self.rules = rules
        self._estimate = estimate
        self._charged = 0  # charged through the handle
        self._reported = False
        self._closed = False
        self._receive = receive
        self._send = send
        self._budget_headers = budget_headers
        self._charge_header = charge_header
        self.status = 0
        self.header_charged = 0  # reported in the charge header or trailer, in micro-units
        self.header_reported = False
        self.expect_trailers = False
        # "completed" once the final message went out, "disconnected" if the client left first.
        self.ended = ""

    async def receive_watching_disconnect(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.ended:
            self.ended = "disconnected"
        return message

    async def send_with_budget_headers(self, message: Message) -> None:
        kind = message["type"]
        final = False
        if kind == "http.response.start":
            self.status = message["status"]
            self.expect_trailers = message.get("trailers", False)  # read for its truth only
            raw = message.get("headers", ())
            # Every response passes here: the headers are copied as they are unless one could be
            # the charge header (only a name of its length can be) or is not a tuple, which
            # _without_charge turns into one.
            size = len(self._charge_header)
            for header in raw:
                if type(header) is not tuple or len(header[0]) == size:
                    headers = self._without_charge(raw, "header")
                    headers += self._budget_headers
                    break
            else:
                # A list (what frameworks send) is concatenated: cheaper than unpacking both.
                headers = (
                    raw + self._budget_headers if type(raw) is list else [*raw, *self._budget_headers]
                )
            # A copy: the app's own message is left as it was (dict.copy is the cheaper copy).
            message = message.copy() if type(message) is dict else dict(message)
            message["headers"] = headers
        elif kind == "http.response.body":
            final = not message.get("more_body", False) and not self.expect_trailers
        elif kind == "http.response.trailers":
            message = {**message, "headers": self._without_charge(message.get("headers", ()), "trailer")}
            final = not message.get("more_trailers", False)
        elif kind == "http.response.pathsend":
            final = True
        try:
            await self._send(message)
        except OSError:
            if not self.ended:
                self.ended = "disconnected"
            raise
        if final and not self.ended:
            self.ended = "completed"

    def _without_charge(self, headers: Iterable[tuple[bytes, bytes]], where: str) -> Headers:
        """The headers minus the internal charge header, whose value is read as the cost."""
        kept = []
        charge_header = self._charge_header
        for name, value in headers:
            if name.lower() == charge_header:
                self._read_charge(value, f"{charge_header.decode()} {where}")
            else:
                kept.append((name, value))
        return kept

    def _read_charge(self, value: bytes, where: str) -> None:
        try:
            self.header_charged += charge_micros(value.decode("latin-1"), where)
            self.header_reported = True
        except ValueError as exc:
            logger.warning("budget: ignoring bad %s on %s: %s", where, self.reservation_id, exc)


async def _receive_after_end() -> Message:
    raise RuntimeError("receive called after the request's app returned")


async def _send_after_end(message: Message) -> None:
    raise RuntimeError("send called after the request's app returned")


# Built once: the attributes of the reservation counter, by outcome.
_OUTCOME_ATTRS = {
    outcome: {ATTR.OUTCOME: outcome} for outcome in ("admitted", "rejected", "unavailable", "bypassed")
}
# Budgets kept per rule for recent entity ids (``BudgetMiddleware._budget``), and the longest id
# kept: 4096 x 128 bytes per rule at most.
_BUDGET_CACHE = 4096
_CACHED_ID_LENGTH = 128


def _keep(cache: dict[Any, Budget], key: str | bytes | None, budget: Budget) -> None:
    """Keep ``budget`` in a budget cache under ``key``, unless the key is long; a full cache is
    emptied first, so it stays bounded whatever ids clients send."""
    if key is None or len(key) <= _CACHED_ID_LENGTH:
        if len(cache) >= _BUDGET_CACHE:
            cache.clear()
        cache[key] = budget


def _recording_request(scope: Scope, receive: Receive, body_read: list[Message]) -> Request:
    """A ``Request`` for an estimator or identify callable, which may read the body: what they
    read is recorded in ``body_read``, to be replayed to the app."""

    async def receive_recording_body() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            body_read.append(message)
        return message

    return Request(scope, receive_recording_body)


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that first returns the body messages a hook already read."""
    queue = list(messages)

    async def receive_replaying_body() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return receive_replaying_body


class _Missing(Exception):
    def __init__(self, rule: Rule) -> None:
        self.rule = rule
