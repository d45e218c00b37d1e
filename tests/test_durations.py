"""One duration grammar for models.toml's `idle_ttl` and the Ollama API's `keep_alive`."""

from __future__ import annotations

import math

import pytest

from services.runtime.durations import seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (300, 300.0),
        (0.5, 0.5),
        (-1, -1.0),
        ("300", 300.0),
        ("0", 0.0),
        ("-1", -1.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (" 10s ", 10.0),
        ("-5m", -300.0),
    ],
)
def test_numbers_and_go_durations_are_seconds(value: object, expected: float) -> None:
    assert seconds(value) == expected


@pytest.mark.parametrize(
    "value", ["soon", "", "-", "5 m", "5x", "1e3", "nan", "inf", math.nan, math.inf, True, None]
)
def test_anything_else_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        seconds(value)
