"""Estimators: what a request reserves before it runs.

An estimator is ``(request) -> amount`` (sync or async), returning a ``Decimal``, ``int``, ``float``
or decimal string in the budget's unit. A failing estimator never changes a budget: the middleware
answers under its fail mode (closed: 500; open: the request runs unmetered).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from .amounts import Amount, to_micros

__all__ = ["EstimateError", "Estimator", "estimate_micros"]

Estimator = Callable[[Request], "Awaitable[Amount] | Amount"]


class EstimateError(ValueError):
    """The estimator raised or returned something that is not an amount."""


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
            raise EstimateError(f"estimator raised {type(exc).__name__}: {exc}") from exc
        try:
            micros = to_micros(value, what="estimate")
        except ValueError as exc:
            raise EstimateError(str(exc)) from None
    if max_hold is not None and micros > max_hold:
        micros = max_hold
    return micros
