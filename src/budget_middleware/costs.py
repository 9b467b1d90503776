"""Estimators: what a request reserves before it runs.

An estimator is ``(request) -> amount`` (sync or async), returning a ``Decimal``, ``int``, ``float``
or decimal string in the budget's unit. A failing estimator never changes a budget: the middleware
answers 400 when the request is at fault (see ``EstimateError``), and otherwise under its fail mode
(closed: 500; open: the request runs unmetered).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .amounts import Amount, to_micros

__all__ = ["EstimateError", "Estimator", "estimate_micros"]

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
            micros = to_micros(value, what="estimate")
        except ValueError as exc:
            raise EstimateError(str(exc)) from None
    if max_hold is not None and micros > max_hold:
        micros = max_hold
    return micros
