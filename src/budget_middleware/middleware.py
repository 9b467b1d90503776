"""``BudgetMiddleware``: pure ASGI; reserve on entry, settle exactly once on every exit path.

The request's life (ARCHITECTURE.md): resolve the entity of each rule, estimate, reserve all rules
at once; on rejection answer 429 without calling the app; otherwise call the app with a ``receive``
that sees ``http.disconnect`` and a ``send`` that adds RateLimit headers and sees the final body; and
in ``finally``, whatever happened, hand one settlement to the finalizer without awaiting.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .amounts import format_micros
from .config import BudgetConfig, ConfigError
from .costs import Estimator, Refused, estimate_or_refuse
from .finalizer import Finalizer
from .handle import RequestBudget, get_reservation
from .identity import AmbiguousEntity, EntityHasher
from .journal import Journal
from .ledger import (
    HoldRequest,
    Ledger,
    MemoryLedger,
    Reservation,
    Settlement,
    new_reservation_id,
    redis_ledger_from_url,
)
from .lifespan import log_startup, serve_lifespan
from .reserving import OUTCOME_ATTRS, Reserver
from .resolve import (
    Exclusions,
    Identify,
    MissingEntity,
    Resolver,
    Wanted,
    recording_request,
    refuse_identity,
    replaying,
)
from .responses import (
    admitted_headers,
    send_config_invalid,
    send_identify_failed,
    send_rejection,
    send_unavailable,
)
from .setup_checks import setup_warnings
from .telemetry import instruments
from .watcher import ResponseWatcher

__all__ = ["BudgetMiddleware", "RequestBudget", "get_reservation"]

logger = logging.getLogger("budget_middleware")


def make_ledger(config: BudgetConfig) -> Ledger:
    if config.redis_url:
        return redis_ledger_from_url(
            config.redis_url,
            prefix=config.prefix,
            horizon_ms=config.horizon_ms,
            wait_replicas=config.wait_replicas,
        )
    return MemoryLedger(horizon_ms=config.horizon_ms)


class BudgetMiddleware:
    """Hard spend budgets for an ASGI app. See the README for configuration.

    ``app.add_middleware(BudgetMiddleware)`` reads ``BUDGET_*`` from the environment; or pass a
    ``config``, a ``ledger``, an ``estimate`` callable and an ``identify`` callable (returning
    ``{rule name: entity id}`` after authentication) explicitly. A ``finalizer`` given without a
    ``ledger`` lends its ledger; given with one, it must settle in that same ledger.
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
        # A malformed BUDGET_* variable stops the server at start (the lifespan answers
        # startup.failed naming it) and every request gets a 500 saying so, never a traceback.
        self._startup_error: str | None = None
        self._logged_startup = False  # the configuration and its warnings, once per process
        self._python_config = config is not None
        if config is None:
            try:
                config = BudgetConfig.from_env()
            except ConfigError as exc:
                self._startup_error = f"budget configuration invalid: {exc}"
                config = BudgetConfig()
        self.config = config
        if ledger is None:
            ledger = finalizer.ledger if finalizer is not None else make_ledger(config)
        elif finalizer is not None and finalizer.ledger is not ledger:
            raise ValueError(
                "BudgetMiddleware: the finalizer settles in another ledger than the one given to "
                "reserve in; pass the same ledger to both (or only the finalizer)"
            )
        self.ledger = ledger
        self.hasher = EntityHasher(config.secret)
        self.finalizer = finalizer or Finalizer(
            ledger,
            lease_ms=config.lease_ms,
            timeout_ms=config.timeout_ms,
            hasher=self.hasher,
            span_raw_ids=config.span_raw_ids,
            journal=Journal(config.journal_dir) if config.journal_dir else None,
            max_pending=config.max_pending,
        )
        self._reserver = Reserver(ledger, self.finalizer, self.hasher, config)
        self._estimator = estimate
        self._rules = config.rules
        self._resolver = Resolver(config.rules, self.hasher, identify)
        self._needs_request = estimate is not None or self._resolver.needs_request
        self._rule_names = tuple(r.name for r in self._rules)
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
        self._exclude = Exclusions(config.exclude)

    # -- http: the request's life ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # the finalizer lives around the app's lifespan
                self._logged_startup = True  # at lifespan.startup, by serve_lifespan
                await serve_lifespan(
                    self.app,
                    scope,
                    receive,
                    send,
                    config=self.config,
                    ledger=self.ledger,
                    finalizer=self.finalizer,
                    startup_error=self._startup_error,
                    warnings=self._setup_warnings(),
                )
            else:  # websockets and anything else pass through unmetered
                await self.app(scope, receive, send)
            return
        if not self._logged_startup:  # no lifespan: say at the first request what it would have
            self._log_startup_without_lifespan()
        if self._startup_error is not None:
            await send_config_invalid(send)
            return
        state: dict[str, Any] | None = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        if not self._rules:
            await self._unmetered(scope, receive, send, "no rules configured")
            return
        if self._exclude.paths and self._exclude.match(scope):
            await self._unmetered(scope, receive, send, "excluded")
            return
        if not self.finalizer.running:
            self.finalizer.ensure_running()
        request = None
        body_read: list[Message] = []
        if self._needs_request:
            request = recording_request(scope, receive, body_read)

        # 1. Who is charged, under which rule.
        wanted: Wanted | str | None
        if request is None:  # every id comes from the scope: no coroutine to make
            try:
                wanted = self._resolver.from_scope(scope)
            except (AmbiguousEntity, MissingEntity) as exc:
                await refuse_identity(send, exc, self.config.error_format)
                return
        else:
            wanted = await self._resolve(scope, request, send)
        if wanted is None:  # answered: a bad or missing identity
            return
        if isinstance(wanted, str) or not wanted:  # failing open, or no rule applies
            await self._unmetered(
                scope,
                replaying(body_read, receive) if body_read else receive,
                send,
                wanted if isinstance(wanted, str) else "no rule applies",
            )
            return

        # 2. How much to hold.
        estimate: int | Refused = self._fixed_estimate
        if self._estimator is not None and request is not None:
            estimate = await estimate_or_refuse(self._estimator, request, send, self.config)
        if body_read:  # what a hook read goes to the app as it came
            receive = replaying(body_read, receive)
        if isinstance(estimate, Refused):
            if estimate is Refused.RUN_UNMETERED:
                await self._unmetered(scope, receive, send, "estimate failed")
            return  # else answered: the estimate failed

        # 3. Reserve every rule at once.
        rid = new_reservation_id()
        if len(wanted) == 1:  # most requests have one rule
            rule, budget = wanted[0]
            requests = [HoldRequest(budget, rule.limit_micros, estimate)]
        else:
            requests = [HoldRequest(budget, rule.limit_micros, estimate) for rule, budget in wanted]
        result = await self._reserver.reserve(rid, requests, estimate)
        if result is None:  # the ledger did not answer
            if self.config.fail_mode == "open":
                instruments().reservations.add(1, OUTCOME_ATTRS["bypassed"])
                await self._unmetered(scope, receive, send, "ledger unavailable")
            else:
                await send_unavailable(
                    send, "the budget ledger is unavailable", error_format=self.config.error_format
                )
            return
        reservation, span_context = result
        if not isinstance(reservation, Reservation):
            state["budget"] = RequestBudget(metered=False, reason="rejected")
            await send_rejection(
                send,
                reservation.violations,
                unit=self.config.unit,
                error_format=self.config.error_format,
                hold_retry_after_s=self.config.hold_retry_after_s,
            )
            return

        # 4. Run the app, watching what it sends and whether the client leaves. From here on the
        # hold exists: whatever raises, the finally settles it.
        watch: ResponseWatcher | None = None
        handle: RequestBudget | None = None
        failure = ""
        try:
            self.finalizer.track(reservation)
            names = self._rule_names if len(wanted) == len(self._rules) else _names(wanted)
            headers = admitted_headers(reservation.holds, reservation.now_ms)
            watch = ResponseWatcher(receive, send, headers, self._charge_header, rid)
            handle = RequestBudget(metered=True, reservation_id=rid, rules=names, estimate=estimate)
            state["budget"] = handle
            await self.app(scope, watch.receive_watching_disconnect, watch.send_with_budget_headers)
        except Exception:
            failure = "error"
            raise
        except BaseException:
            failure = "cancelled"
            raise
        finally:
            self._settle(reservation, estimate, watch, handle, failure, span_context)

    def _settle(
        self,
        reservation: Reservation,
        estimate: int,
        watch: ResponseWatcher | None,
        handle: RequestBudget | None,
        failure: str,
        span_context: trace.SpanContext,
    ) -> None:
        """Hand the request's settlement to the finalizer: synchronous, so nothing cancels it.

        The reason is how the response went (completed or disconnected), else how the app ended
        (an app that returned without finishing its response is an error). The actual cost is what
        was reported; else nothing for a status >= 400, else the estimate or zero by reason.
        """
        reason = (watch.ended if watch is not None else "") or failure or "error"
        reported = handle.close() if handle is not None else None
        actual: int
        if watch is not None and watch.header_reported:
            actual = (reported or 0) + watch.header_charged
        elif reported is not None:
            actual = reported
        elif watch is not None and watch.status >= 400:
            actual = 0
        else:
            actual = estimate if self._charges_estimate[reason] else 0
        if watch is not None:
            watch.release()
        trace_id = (
            ""
            if span_context is INVALID_SPAN_CONTEXT or not span_context.is_valid
            else format(span_context.trace_id, "032x")
        )
        self.finalizer.submit(
            Settlement(
                reservation.id,
                reservation.holds,
                actual,
                reason,
                estimate,
                context=span_context,
                trace_id=trace_id,
            )
        )
        if actual > estimate:
            logger.info(
                "budget: %s overran its estimate (%s > %s); charged in full",
                reservation.id,
                format_micros(actual),
                format_micros(estimate),
            )

    def _setup_warnings(self) -> list[str]:
        return setup_warnings(
            self.config,
            python_config=self._python_config,
            environ=os.environ,
            estimator=self._estimator is not None,
        )

    def _log_startup_without_lifespan(self) -> None:
        self._logged_startup = True
        if self._startup_error is not None:
            logger.error("%s; every request is answered 500 until it is fixed", self._startup_error)
        else:
            log_startup(self.config, self.ledger, self._setup_warnings())

    async def _unmetered(self, scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        """Run the app without a reservation; the handle says why."""
        scope["state"]["budget"] = RequestBudget(metered=False, reason=reason)
        await self.app(scope, receive, send)

    async def _resolve(self, scope: Scope, request: Request, send: Send) -> Wanted | str | None:
        """The budgets of a request that hooks look at; None once a 400, 401 or 500 has been
        answered; or, when identify failed and the fail mode is open, why it runs unmetered."""
        try:
            return await self._resolver.resolve(scope, request)
        except (AmbiguousEntity, MissingEntity) as exc:
            await refuse_identity(send, exc, self.config.error_format)
        except Exception as exc:
            logger.exception("budget: identify failed")
            if self.config.fail_mode == "open":
                return f"identify failed: {exc}"
            await send_identify_failed(send, error_format=self.config.error_format)
        return None


def _names(wanted: Wanted) -> tuple[str, ...]:
    return tuple(rule.name for rule, _ in wanted)
