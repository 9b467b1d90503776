"""Money as integer micro-units.

Amounts cross the public API as ``Decimal``, ``int``, ``float`` or a decimal string and are stored
as integers in micro-units (1e-6 of the unit: $1 == 1_000_000), so every sum in the ledger is exact.
This module imports nothing of the package.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["MICROS", "Amount", "format_micros", "to_micros"]

MICROS = 1_000_000
_MICRO_EXP = Decimal("0.000001")
# Far above any real budget, far below where Lua's doubles stop being exact (2**53).
_MAX_MICROS = 2**52

Amount = Decimal | int | float | str


def to_micros(value: Amount, *, what: str = "amount") -> int:
    """Convert a user-supplied amount to integer micro-units.

    Rejects, with a ``ValueError`` that names the value: booleans, NaN, infinities, negatives,
    values finer than one micro-unit (they would round silently) and values too large to be exact.
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
        raise ValueError(f"{what} {value!r} is finer than one micro-unit (1e-6) and would round")
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
