"""The lifespan wrapper: the finalizer lives in a task group around the app's own lifespan.

On ``lifespan.startup`` the finalizer's worker starts (and takes over the journals of processes that
ended) before the app's startup runs; on ``lifespan.shutdown`` it is drained (requests have ended,
or been cancelled, by then) before the app's shutdown runs; the ledger is closed before the server
hears that shutdown completed, since some servers cancel the lifespan as soon as it has.

Whatever ends the lifespan (a shutdown message, a server that cancels it, a forced exit that
cancels every task), the drain runs to its end once, shielded, with its deadline; and if even
that is cut short, the finalizer stops without an await: every settlement handed over is applied,
journaled, or counted and logged as lost.

A middleware whose configuration is invalid answers ``lifespan.startup`` with
``lifespan.startup.failed`` naming the error, so the server stops at start instead of serving.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import BudgetConfig
from .finalizer import Finalizer
from .ledger import Ledger, MemoryLedger

__all__ = ["serve_lifespan"]

logger = logging.getLogger("budget_middleware")

_CLOSE_TIMEOUT_S = 2.0


async def serve_lifespan(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    config: BudgetConfig,
    ledger: Ledger,
    finalizer: Finalizer,
    startup_error: str | None = None,
    warnings: Sequence[str] = (),
) -> None:
    """Run ``app``'s lifespan with the finalizer started around it (see the module docstring)."""
    if startup_error is not None:
        await _refuse_startup(receive, send, startup_error)
        return
    lifespan = _Lifespan(config, ledger, finalizer, warnings)
    await lifespan.run(app, scope, receive, send)


async def _refuse_startup(receive: Receive, send: Send, error: str) -> None:
    """Answer the server's startup with the configuration error: one line, no traceback."""
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": error})


class _Lifespan:
    """The state of one lifespan: whether the finalizer started, whether the ledger is closed."""

    def __init__(
        self, config: BudgetConfig, ledger: Ledger, finalizer: Finalizer, warnings: Sequence[str]
    ) -> None:
        self.config = config
        self.warnings = warnings
        self.ledger = ledger
        self.finalizer = finalizer
        self.drain_s = config.drain_timeout_ms / 1000
        self.started = False
        self.closed = False

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(app, scope, receive, send)
        except BaseExceptionGroup as group:
            # The task group wraps whatever the app's own lifespan raised: the server (and the
            # app's author) see that exception itself, as without this middleware.
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if exc is group:
                raise
            raise exc from exc.__cause__

    async def _run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def receive_managing_finalizer() -> Message:
                message = await receive()
                if message["type"] == "lifespan.startup" and not self.started:
                    await tg.start(self.finalizer.run)
                    self.started = True
                    log_startup(self.config, self.ledger, self.warnings)
                elif message["type"] == "lifespan.shutdown" and self.started:
                    # Requests have ended (or been cancelled) by now: apply their settlements
                    # before the app's own shutdown runs.
                    with anyio.CancelScope(shield=True):
                        await self.finalizer.drain(self.drain_s)
                return message

            async def send_closing_ledger(message: Message) -> None:
                # Some servers cancel the lifespan task as soon as shutdown completes, so finish
                # our own shutdown first.
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    with anyio.CancelScope(shield=True):
                        await self.drain_and_close()
                await send(message)

            try:
                await app(scope, receive_managing_finalizer, send_closing_ledger)
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.drain_and_close()
                    except BaseException:
                        # Cut short even under the shield (a task cancelled by the event loop
                        # itself as the process exits): stop without an await.
                        self.finalizer.abandon("shutdown cut short")
                        raise
                tg.cancel_scope.cancel()

    async def drain_and_close(self) -> None:
        """Drain the finalizer (again, if an earlier drain was cut short: a drain that finished
        returns at once) and close the ledger, once."""
        if self.started:
            await self.finalizer.drain(self.drain_s)
        if not self.closed:
            self.closed = True
            with anyio.move_on_after(_CLOSE_TIMEOUT_S):
                await self.ledger.aclose()


def log_startup(config: BudgetConfig, ledger: Ledger, warnings: Sequence[str] = ()) -> None:
    logger.info("budget: %s", config.describe())
    for warning in warnings:  # set-ups that silently do nothing or always reject (setup_checks)
        logger.warning("budget: %s", warning)
    if isinstance(ledger, MemoryLedger) and _several_workers():
        logger.warning(
            "budget: the memory ledger is per process and several workers seem to run here; "
            "each enforces the whole limit, so N workers admit up to N times each budget. "
            "Set BUDGET_REDIS_URL to share budgets."
        )


def _several_workers() -> bool:
    try:
        if int(os.environ.get("WEB_CONCURRENCY", "1")) > 1:
            return True
    except ValueError:
        pass
    return multiprocessing.parent_process() is not None or "gunicorn" in os.environ.get(
        "SERVER_SOFTWARE", ""
    )
