"""The validation vocabulary: one message form, `field=value must be ...`."""

import numpy as np
import pytest

from lora_limits import validate


@pytest.mark.parametrize("value,low,high,match", [
    (0, 1, None, r"^n=0 must be an int >= 1$"),
    (7, 1, 6, r"^n=7 must be an int in \[1, 6\]$"),
    (True, 0, None, r"^n=True must be an int >= 0$"),
    (1.0, 0, None, r"^n=1.0 must be an int >= 0$"),
    ("3", None, 5, r"^n='3' must be an int <= 5$"),
])
def test_integer_refuses(value, low, high, match):
  with pytest.raises(ValueError, match=match):
    validate.integer("n", value, low, high)


def test_integer_accepts_numpy_integers_and_bounds():
  validate.integer("n", np.int64(3), 3, 3)
  validate.integer("n", -5)


@pytest.mark.parametrize("value,kwargs,match", [
    (0.0, dict(low=0, low_open=True), r"^x=0.0 must be a finite number > 0$"),
    (float("nan"), dict(), r"^x=nan must be a finite number$"),
    (float("inf"), dict(low=0), r"^x=inf must be a finite number >= 0$"),
    (1.0, dict(low=0, high=1, high_open=True), r"^x=1.0 must be a finite number in \[0, 1\)$"),
    (False, dict(), r"^x=False must be a finite number$"),
    ("1", dict(), r"^x='1' must be a finite number$"),
])
def test_number_refuses(value, kwargs, match):
  with pytest.raises(ValueError, match=match):
    validate.number("x", value, **kwargs)


def test_number_accepts():
  validate.number("x", 1, 0, 1)
  validate.number("x", np.float32(0.5), 0, 1, low_open=True, high_open=True)


def test_choice_and_boolean():
  validate.choice("mode", "a", ("a", "b"))
  with pytest.raises(ValueError, match=r"^mode='c' is not one of \['a', 'b'\]$"):
    validate.choice("mode", "c", ("a", "b"))
  with pytest.raises(ValueError, match=r"^mode=1 is not one of"):
    validate.choice("mode", 1, ("a", "b"))
  validate.boolean("flag", False)
  with pytest.raises(ValueError, match=r"^flag=1 must be a bool$"):
    validate.boolean("flag", 1)
