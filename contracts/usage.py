"""What a request cost in tokens: in `done` events and classify replies, and what tenants' limits count."""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
