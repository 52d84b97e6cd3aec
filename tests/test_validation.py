"""Argument checks: the accepted value comes back, a refused one is named with what is allowed."""

import math

import pytest

from metaquant.validation import check_choice, check_int, check_number, is_int, is_number


def test_accepted_values_come_back_unchanged():
    assert check_int("batch_size", 32, minimum=1) == 32
    assert check_number("momentum", 0.9, low=0, high=1, high_open=True) == 0.9
    assert check_choice("optimizer", "adam", ("sgd", "adam")) == "adam"


@pytest.mark.parametrize(
    "check, message",
    [
        (lambda: check_int("batch_size", 0, minimum=1), "batch_size must be an integer >= 1, got 0"),
        (lambda: check_int("bits", 9, 1, 8), "bits must be an integer in 1..8, got 9"),
        (lambda: check_int("steps", True), "steps must be an integer, got True"),
        (
            lambda: check_number("momentum", 1.0, 0, 1, high_open=True),
            r"momentum must be a number in \[0, 1\), got 1.0",
        ),
        (lambda: check_number("lr", 0, low=0, low_open=True), "lr must be a number > 0, got 0"),
        (lambda: check_number("lr", math.inf, low=0), "lr must be a finite number >= 0, got inf"),
        (lambda: check_number("w", math.nan, 0, 1), r"w must be a number in \[0, 1\], got nan"),
        (
            lambda: check_choice("optimizer", "rmsprop", ("sgd", "adam")),
            "optimizer 'rmsprop' is not supported; allowed: sgd, adam",
        ),
    ],
)
def test_a_refused_value_is_named_with_what_is_allowed(check, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check()


def test_a_bool_is_neither_a_count_nor_a_number_and_a_non_finite_float_is_no_number():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False) and not is_number(math.nan)
