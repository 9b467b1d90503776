"""Amounts as integer micro-units (DESIGN.md section 3)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from budget_middleware.amounts import MICROS, format_micros, to_decimal, to_micros

MAX_MICROS = 2**52


class TestToMicrosAcceptsEveryNumericForm:
    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            (Decimal("0"), 0),
            (Decimal("1"), 1_000_000),
            (Decimal("0.000001"), 1),
            (Decimal("12.345678"), 12_345_678),
            (Decimal("1.500000000"), 1_500_000),  # trailing zeros are not extra precision
            (Decimal("1E+2"), 100_000_000),
            (Decimal("-0"), 0),
        ],
    )
    def test_decimal(self, value: Decimal, micros: int) -> None:
        assert to_micros(value) == micros

    @pytest.mark.parametrize(("value", "micros"), [(0, 0), (1, MICROS), (50, 50 * MICROS)])
    def test_int(self, value: int, micros: int) -> None:
        assert to_micros(value) == micros

    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            (0.0, 0),
            (0.1, 100_000),  # the shortest repr, not 0.1000000000000000055...
            (0.3, 300_000),
            (1.5, 1_500_000),
            (0.000001, 1),
            (19.99, 19_990_000),
            (-0.0, 0),
        ],
    )
    def test_float(self, value: float, micros: int) -> None:
        assert to_micros(value) == micros

    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            ("0", 0),
            ("2.5", 2_500_000),
            ("  2.5\n", 2_500_000),
            ("0.000001", 1),
            ("1e3", 1_000 * MICROS),
            ("007", 7 * MICROS),
        ],
    )
    def test_str(self, value: str, micros: int) -> None:
        assert to_micros(value) == micros

    def test_sum_of_float_inputs_is_exact(self) -> None:
        assert sum(to_micros(0.1) for _ in range(10)) == to_micros(1)

    def test_largest_value_is_accepted(self) -> None:
        largest = Decimal(MAX_MICROS) / MICROS
        assert to_micros(largest) == MAX_MICROS


class TestToMicrosRejects:
    @pytest.mark.parametrize(
        "value",
        [
            float("nan"),
            Decimal("NaN"),
            Decimal("sNaN"),
            "nan",
            float("inf"),
            float("-inf"),
            Decimal("Infinity"),
            "-Infinity",
        ],
        ids=repr,
    )
    def test_not_finite(self, value: object) -> None:
        with pytest.raises(ValueError, match="finite") as info:
            to_micros(value)  # type: ignore[arg-type]
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize("value", [-1, -0.5, Decimal("-0.000001"), "-3", -(2**60)], ids=repr)
    def test_negative(self, value: object) -> None:
        with pytest.raises(ValueError, match="negative") as info:
            to_micros(value)  # type: ignore[arg-type]
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize("value", [True, False], ids=repr)
    def test_bool(self, value: bool) -> None:
        with pytest.raises(ValueError, match="must be a number") as info:
            to_micros(value)
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize(
        "value", [Decimal("0.0000001"), 1e-7, "1.0000001", 0.1234567, Decimal("1E-10")], ids=repr
    )
    def test_finer_than_one_micro(self, value: object) -> None:
        with pytest.raises(ValueError, match="finer than one micro-unit") as info:
            to_micros(value)  # type: ignore[arg-type]
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize(
        "value",
        [
            MAX_MICROS // MICROS + 1,
            Decimal(MAX_MICROS + 1) / MICROS,
            1e300,
            "1e30",
            10**40,
            Decimal("9E+999999"),  # would overflow Decimal arithmetic if scaled first
            "1e999999999",
        ],
        ids=repr,
    )
    def test_too_large(self, value: object) -> None:
        with pytest.raises(ValueError, match="too large") as info:
            to_micros(value)  # type: ignore[arg-type]
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize("value", ["", "abc", "1,5", "$5", "1.2.3", "0x10", "5 USD"], ids=repr)
    def test_garbage_string(self, value: str) -> None:
        with pytest.raises(ValueError, match="not a decimal number") as info:
            to_micros(value)
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize("value", [None, [1], b"1", 1j], ids=repr)
    def test_other_types(self, value: object) -> None:
        with pytest.raises(ValueError, match="must be a Decimal, int, float or str"):
            to_micros(value)  # type: ignore[arg-type]

    def test_error_names_what(self) -> None:
        with pytest.raises(ValueError, match=r"^limit must not be negative"):
            to_micros(-1, what="limit")


class TestFormatMicros:
    @pytest.mark.parametrize(
        ("micros", "text"),
        [
            (0, "0"),
            (1, "0.000001"),
            (10, "0.00001"),
            (1_000_000, "1"),
            (1_500_000, "1.5"),
            (12_345_678, "12.345678"),
            (50 * MICROS, "50"),
            (-1_500_000, "-1.5"),
            (-1, "-0.000001"),
            (MAX_MICROS, "4503599627.370496"),
        ],
    )
    def test_format(self, micros: int, text: str) -> None:
        assert format_micros(micros) == text

    @pytest.mark.parametrize("micros", [0, 1, 999_999, 1_000_000, 1_000_001, 123_456_789, MAX_MICROS])
    def test_round_trip(self, micros: int) -> None:
        assert to_micros(format_micros(micros)) == micros
        assert to_micros(Decimal(format_micros(micros))) == micros
        assert to_micros(to_decimal(micros)) == micros

    def test_to_decimal(self) -> None:
        assert to_decimal(0) == Decimal(0)
        assert to_decimal(1_500_000) == Decimal("1.5")
        assert to_decimal(1) == Decimal("0.000001")


class TestCostsRoundUp:
    """A cost (a charge, an estimator's answer) finer than one micro-unit is rounded up, never
    refused: refusing it failed the request and recorded no spend (found following the README:
    ``max_tokens * 0.00002`` in floats was refused for 123 tokens)."""

    @pytest.mark.parametrize(
        ("value", "micros"),
        [
            (0.1 + 0.2, 300_000),  # float noise is not a fraction of a micro-unit
            (123 * 0.00002, 2_460),
            (0.0012300000000000002, 1_230),
            (Decimal(1234) * Decimal("0.00000015"), 186),  # $0.15 per million tokens: exact, up
            ("0.0000001", 1),
            (1e-7, 1),
            (Decimal("1E-10"), 1),
            ("1.0000001", 1_000_001),
            (0, 0),
            ("0.000001", 1),
        ],
        ids=repr,
    )
    def test_a_cost_is_rounded_up_to_the_micro_unit(self, value: object, micros: int) -> None:
        assert to_micros(value, what="charge", round_up=True) == micros  # type: ignore[arg-type]

    def test_a_charge_rounds_up_through_the_handle(self) -> None:
        from budget_middleware.handle import RequestBudget

        handle = RequestBudget(metered=True, reservation_id="r", rules=("user",), estimate=10)
        handle.charge(0.1 + 0.2)
        handle.charge("0.0000001")
        assert handle.charged == Decimal("0.300001")

    @pytest.mark.parametrize("value", [-1e-7, float("nan"), "abc", True])
    def test_what_is_not_a_cost_is_still_refused(self, value: object) -> None:
        with pytest.raises(ValueError, match="charge"):
            to_micros(value, what="charge", round_up=True)  # type: ignore[arg-type]
