"""What a model costs: `[costs]` in infra/models.toml, per million tokens, re-read when it changes.

```toml
[costs]
"llama3.2:*" = { prompt = 0.10, completion = 0.40 }   # model glob = money per 1M tokens
```
The first glob that matches wins; a model no glob matches costs nothing. The currency is yours.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tomllib
from pathlib import Path

import msgspec

log = logging.getLogger("llmbus.ledger")


class Price(msgspec.Struct, forbid_unknown_fields=True):
    prompt: float = 0.0
    completion: float = 0.0


class Costs:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self.prices: dict[str, Price] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-reads the file when its mtime or size changed; a broken file keeps the old prices."""
        try:
            st = os.stat(self.path)
        except OSError:
            self.prices, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            doc = tomllib.loads(self.path.read_text())
            self.prices = msgspec.convert(doc.get("costs", {}), dict[str, Price])
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            log.error("invalid [costs] in %s: %s; keeping the previous prices", self.path, exc)

    def of(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        for pattern, price in self.prices.items():
            if fnmatch.fnmatchcase(model, pattern):
                return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1_000_000
        return 0.0
