"""Estimators: what a request reserves before it runs.

An estimator is ``(request) -> amount`` (sync or async), returning a ``Decimal``, ``int``, ``float``
or decimal string in the budget's unit. A failing estimator never changes a budget: the middleware
answers 400 when the request is at fault (see ``EstimateError``), and otherwise under its fail mode
(closed: 500; open: the request runs unmetered).
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode
from starlette.requests import ClientDisconnect, Request
from starlette.types import Send

from . import telemetry
from .amounts import Amount, to_micros
from .responses import send_estimate_failed
from .telemetry import ATTR, SPAN_RESERVE

if TYPE_CHECKING:
    from .config import BudgetConfig

__all__ = [
    "EstimateError",
    "Estimator",
    "Refused",
    "estimate_micros",
    "estimate_or_refuse",
]

logger = logging.getLogger("budget_middleware")


class Refused(enum.Enum):
    """What ``estimate_or_refuse`` returns instead of an estimate when the estimate failed."""

    RUN_UNMETERED = "unmetered"  # failing open: the request runs without a reservation
    ANSWERED = "answered"  # a 400 or 500 has been sent


# What an estimator raises when the request it reads is malformed: the client's error.
_CLIENT_ERRORS = (ValueError, LookupError, TypeError, ClientDisconnect)

Estimator = Callable[[Request], "Awaitable[Amount] | Amount"]


class EstimateError(ValueError):
    """The estimator raised or returned something that is not an amount.

    ``client_error`` is True when the request itself is at fault: the estimator raised a
    ``ValueError`` (which includes ``json.JSONDecodeError`` and ``UnicodeDecodeError``), a
    ``LookupError`` or a ``TypeError`` while reading it (a body that is not JSON, or of the wrong
    shape), or the client left while its body was read. The middleware answers 400 then, and 500
    (or, failing open, runs the request unmetered) for anything else.
    """

    def __init__(self, message: str, *, client_error: bool = False) -> None:
        super().__init__(message)
        self.client_error = client_error


async def estimate_micros(
    estimator: Estimator | None, request: Request | None, default: int, max_hold: int | None
) -> int:
    if estimator is None or request is None:
        micros = default
    else:
        try:
            value: Any = estimator(request)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise EstimateError(
                f"estimator raised {type(exc).__name__}: {exc}",
                client_error=isinstance(exc, _CLIENT_ERRORS),
            ) from exc
        try:
            micros = to_micros(value, what="estimate", round_up=True)
        except ValueError as exc:
            raise EstimateError(str(exc)) from None
    if max_hold is not None and micros > max_hold:
        micros = max_hold
    return micros


async def estimate_or_refuse(
    estimator: Estimator | None, request: Request, send: Send, config: BudgetConfig
) -> int | Refused:
    """The estimate in micro-units; ``Refused.RUN_UNMETERED`` when it failed and the fail mode is
    open; ``Refused.ANSWERED`` once a 400 (the request is at fault) or a 500 has been sent. A
    failure changes no budget, and is recorded on a ``budget.reserve`` span of outcome ``error``."""
    try:
        return await estimate_micros(estimator, request, config.estimate, config.max_hold)
    except EstimateError as exc:
        with telemetry.tracer.start_as_current_span(SPAN_RESERVE) as span:
            span.set_attribute(ATTR.OUTCOME, "error")
            span.set_status(Status(StatusCode.ERROR, str(exc)))
        if exc.client_error:
            logger.info("budget: the request could not be estimated: %s", exc)
        else:
            logger.error("budget: %s", exc)
            if config.fail_mode == "open":
                return Refused.RUN_UNMETERED
        await send_estimate_failed(send, client_error=exc.client_error, error_format=config.error_format)
        return Refused.ANSWERED
