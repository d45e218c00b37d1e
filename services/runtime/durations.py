"""Durations as people and Ollama write them: `300`, `"5m"`, `"1h30m"`, `"0.5s"`, `"-1"`.

One grammar for `infra/models.toml`'s `idle_ttl` and the Ollama API's `keep_alive` (Go's duration
units `ms`, `s`, `m`, `h`; a bare number is seconds; a leading `-` makes it negative).
"""

from __future__ import annotations

import re
from typing import Any

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value: Any) -> float:
    """Seconds from a number or a duration string; raises `ValueError` for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration")
    text = value.strip()
    sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    try:
        return sign * float(text)
    except ValueError:
        pass
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f'{value!r} is not a duration (e.g. 300, "5m", "1h30m")')
    return sign * sum(float(n) * _SECONDS[u] for n, u in parts)
