"""Durations as people and Ollama write them: `300`, `"5m"`, `"1h30m"`, `"0.5s"`, `"-1"`.

One grammar for `infra/models.toml`'s `idle_ttl` and the Ollama API's `keep_alive` (Go's duration
units `ms`, `s`, `m`, `h`; a bare number is seconds; a leading `-` makes it negative).
"""

from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value: Any) -> float:
    """Seconds from a number or a duration string; raises `ValueError` for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        duration = float(value)
    elif isinstance(value, str):
        duration = _parse(value.strip())
    else:
        duration = math.nan
    if not math.isfinite(duration):  # also NaN and infinity, which no timer takes
        raise ValueError(f'{value!r} is not a duration (e.g. 300, "5m", "1h30m")')
    return duration


def _parse(text: str) -> float:
    sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    if _NUMBER.fullmatch(text):
        return sign * float(text)
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return math.nan
    return sign * sum(float(n) * _SECONDS[u] for n, u in parts)
