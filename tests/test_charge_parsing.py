"""The request path's fast charge parser agrees exactly with ``to_micros``: the same value, or a
ValueError with the same message, for every input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget_middleware import to_micros
from budget_middleware.handle import charge_micros


def outcome(convert: Any, value: Any) -> object:
    try:
        return ("ok", convert(value))
    except ValueError as exc:
        return ("error", str(exc))
    except Exception as exc:  # any other exception type must also agree
        return ("exc", type(exc).__name__, str(exc))


def same(value: Any) -> None:
    fast = outcome(lambda v: charge_micros(v, "x-budget-charge header"), value)
    slow = outcome(lambda v: to_micros(v, what="x-budget-charge header", round_up=True), value)
    assert fast == slow, (value, fast, slow)


TABLE = [
    "1e3", "-0", "+1", " 1", "1 ", "\t1\n", "1_000", "0.0000001", "0.000001", "NaN", "nan", "sNaN",
    "Infinity", "-Infinity", "inf", "\u0661", "\u0661.\u0665", "1.\u0661", "\u00b2", "\uff11",
    "1.", ".5", ".", "", "0", "00", "000000000", "999999999", "999999999.999999", "1000000000",
    "0000000001.5", "1.000000", "1.0000000", "1.5000000", "4503599627.370496", "4503599627.370497",
    "1" * 5000, "0." + "0" * 5000 + "1", "0." + "0" * 5000, "1.5e-1", "1E3", "0x10", "1,5",
    "1.5.5", "--1", "+0.5", "-0.0", "0.-1", "1.-", "1.+5", "1. 5", " ", "1\x00", "\u0000",
    "\ud800", "١٢٣", "１２３", "1.２", 0, 1, 2.5, float("nan"), float("inf"), -1, True, None, b"1",
]  # fmt: skip


@pytest.mark.parametrize("value", TABLE, ids=range(len(TABLE)))
def test_table(value: Any) -> None:
    same(value)


ALPHABET = "0123456789.+-_eE nNaIifty\t\n\u0661\u00b2\uff11x"


@settings(max_examples=1_500, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=24))
def test_property_small_alphabet(text: str) -> None:
    same(text)


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"\A[0-9]{0,12}(\.[0-9]{0,9})?\Z"))
def test_property_plain_decimals(text: str) -> None:
    same(text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_property_any_text(text: str) -> None:
    same(text)
