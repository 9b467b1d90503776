"""Money as integer micro-units.

Amounts cross the public API as ``Decimal``, ``int``, ``float`` or a decimal string and are stored
as integers in micro-units (1e-6 of the unit: $1 == 1_000_000), so every sum in the ledger is exact.
This module imports nothing of the package.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = ["MICROS", "Amount", "format_micros", "to_micros"]

MICROS = 1_000_000
_MICRO_EXP = Decimal("0.000001")
_NOISE_EXP = Decimal("1E-12")
# Far above any real budget, far below where Lua's doubles stop being exact (2**53).
_MAX_MICROS = 2**52

Amount = Decimal | int | float | str


def to_micros(value: Amount, *, what: str = "amount", round_up: bool = False) -> int:
    """Convert a user-supplied amount to integer micro-units.

    Rejects, with a ``ValueError`` that names the value: booleans, NaN, infinities, negatives and
    values too large to be exact. A value finer than one micro-unit is refused too (a limit or a
    configured estimate of that kind is a typo), unless ``round_up``: a cost (a charge, or what an
    estimator returns) is then rounded up to the next micro-unit, so spend is never under-counted,
    and a float is first rid of its binary noise (``0.1 + 0.2`` is 0.3, not 0.300001).
    """
    if type(value) is int and 0 <= value <= _MAX_MICROS // MICROS:  # the common case, exact
        return value * MICROS
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, float):
        # repr() gives the shortest decimal that round-trips: 0.1 -> "0.1", not 0.1000000000000000055
        dec = Decimal(repr(value))
        if round_up and dec.is_finite() and dec.adjusted() < 16:
            # Float arithmetic leaves noise far below a micro-unit (0.1 + 0.2 == 0.30000000000000004):
            # kept to 1e-12, what a cost computed in floats means.
            dec = dec.quantize(_NOISE_EXP, rounding=ROUND_HALF_EVEN)
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{what} is not a decimal number: {value!r}") from None
    else:
        raise ValueError(f"{what} must be a Decimal, int, float or str, got {type(value).__name__}")
    if not dec.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    if dec < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if dec and dec.adjusted() > 16:  # far past the largest exact amount; keeps Decimal from overflowing
        raise ValueError(f"{what} {value!r} is too large (at most {format_micros(_MAX_MICROS)})")
    scaled = dec * MICROS
    if scaled != scaled.to_integral_value():
        if not round_up:
            raise ValueError(f"{what} {value!r} is finer than one micro-unit (1e-6) and would round")
        scaled = scaled.to_integral_value(rounding=ROUND_CEILING)
    micros = int(scaled)
    if micros > _MAX_MICROS:
        raise ValueError(f"{what} {value!r} is too large (at most {format_micros(_MAX_MICROS)})")
    return micros


def check_micros(value: object, *, what: str = "amount") -> int:
    """``value`` if it is already an amount in micro-units (an ``int``, not a ``bool``, from 0 to
    the largest exact amount); else a ``ValueError`` that names it. For the ledger's own calls,
    which take micro-units; ``to_micros`` converts what users write."""
    if type(value) is not int or not 0 <= value <= _MAX_MICROS:
        raise ValueError(f"{what} must be an int of micro-units from 0 to {_MAX_MICROS}, got {value!r}")
    return value


def format_micros(micros: int) -> str:
    """Format micro-units as a plain decimal string: 1_500_000 -> "1.5", 0 -> "0"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def to_decimal(micros: int) -> Decimal:
    """Micro-units back to a ``Decimal`` in the unit."""
    return (Decimal(micros) * _MICRO_EXP).normalize() if micros else Decimal(0)
