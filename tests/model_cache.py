"""Where tests keep the embedded models: `tests/.models/` (gitignored), shared by every test and
every run of this checkout, so SmolLM2 is downloaded once per machine (CI: once per fresh one),
never from the user's data directory."""

from __future__ import annotations

from pathlib import Path

CACHE = Path(__file__).parent / ".models"
ENV = {"LLMBUS_LOCAL_CACHE": str(CACHE)}
