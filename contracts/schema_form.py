"""The exported schemas' text, the same whichever msgspec is installed."""

from __future__ import annotations

import inspect
from typing import Any


def normalised(node: Any) -> Any:
    """The schema with every docstring-derived `description` dedented as `inspect.cleandoc` does:
    msgspec 0.23 started cleaning them itself, 0.22 did not, and the exported bytes must not depend
    on which one is installed."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else normalised(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [normalised(item) for item in node]
    return node
