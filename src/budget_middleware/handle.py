"""The budget handle of one request: what app code charges its actual cost to."""

from __future__ import annotations

from decimal import Decimal

from starlette.requests import HTTPConnection

from .amounts import MICROS, Amount, format_micros, to_decimal, to_micros

__all__ = ["RequestBudget", "get_reservation"]


class RequestBudget:
    """The budget handle of one request: ``get_reservation(request).charge(amount)``.

    Exists on every HTTP request that passes the middleware; ``metered`` says whether a reservation
    backs it (excluded paths, requests no rule applies to, and fail-open bypasses are unmetered).
    """

    __slots__ = (
        "_charged",
        "_closed",
        "_estimate",
        "_reported",
        "metered",
        "reason",
        "reservation_id",
        "rules",
    )

    def __init__(
        self,
        *,
        metered: bool,
        reason: str = "",
        reservation_id: str | None = None,
        rules: tuple[str, ...] = (),
        estimate: int = 0,
    ) -> None:
        self.metered = metered
        self.reason = reason
        self.reservation_id = reservation_id
        self.rules = rules
        self._estimate = estimate
        self._charged = 0
        self._reported = False
        self._closed = False

    def charge(self, amount: Amount) -> None:
        """Report actual cost; may be called many times (per streamed chunk, say), it adds up.

        Any call, even ``charge(0)``, makes the reported total the actual cost of the request. An
        amount finer than one micro-unit is rounded up to the next one (a float's binary noise
        aside). Raises ``ValueError`` for a negative, NaN, infinite or malformed amount (nothing is
        charged)
        and ``RuntimeError`` after the request's settlement was handed over.
        """
        micros = charge_micros(amount, "charge")
        if self._closed:
            raise RuntimeError(
                f"budget of request {self.reservation_id} was already settled; charge the "
                "request before its response ends"
            )
        self._charged += micros
        self._reported = True

    def close(self) -> int | None:
        """Called by the middleware as the request's settlement is made: the reported total in
        micro-units (None if nothing was reported); the handle takes no charge from now on."""
        self._closed = True
        return self._charged if self._reported else None

    @property
    def estimate(self) -> Decimal:
        return to_decimal(self._estimate)

    @property
    def charged(self) -> Decimal:
        return to_decimal(self._charged)

    @property
    def reported(self) -> bool:
        return self._reported

    def __repr__(self) -> str:
        if not self.metered:
            return f"RequestBudget(metered=False, reason={self.reason!r})"
        return (
            f"RequestBudget(id={self.reservation_id}, rules={list(self.rules)}, "
            f"estimate={format_micros(self._estimate)}, charged={format_micros(self._charged)})"
        )


def charge_micros(amount: Amount, what: str) -> int:
    """``to_micros(amount, what=what)``, with a plain decimal string such as ``"0.0023"`` converted
    without ``Decimal``: a cost is reported on every request, often as such a string, and parsing
    it through ``Decimal`` costs more than the rest of the settlement.

    Plain: ASCII digits, at most 9 before the point (far below the largest exact amount) and 1 to 6
    after it, exactly the strings ``to_micros`` turns into integers without rounding or refusing.
    The plain strings seen last are kept with their value (at most ``_PLAIN_CACHE``), since an app
    tends to report the same few prices again and again.
    """
    if type(amount) is str:
        micros = _plain.get(amount)
        if micros is not None:
            return micros
        whole, point, fraction = amount.partition(".")
        if (
            0 < len(whole) <= 9
            and whole.isascii()
            and whole.isdigit()
            and (not point or (0 < len(fraction) <= 6 and fraction.isascii() and fraction.isdigit()))
        ):
            micros = int(whole) * MICROS + (int(fraction.ljust(6, "0")) if point else 0)
            if len(_plain) >= _PLAIN_CACHE:
                _plain.clear()
            _plain[amount] = micros
            return micros
    return to_micros(amount, what=what, round_up=True)


# Plain decimal strings already converted by ``charge_micros``: at most 1024 short strings.
_PLAIN_CACHE = 1024
_plain: dict[str, int] = {}


def get_reservation(request: HTTPConnection) -> RequestBudget:
    """The budget handle of ``request`` (also at ``request.state.budget``)."""
    handle = request.scope.get("state", {}).get("budget")
    if not isinstance(handle, RequestBudget):
        raise RuntimeError("no budget on this request: is BudgetMiddleware installed?")
    return handle
