"""What a request cost in tokens (in `done` events and classify replies, what tenants' limits count),
and who asked for it (`Origin`, the `Llmbus-Origin` header the ledger records)."""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


CACHE_HOST = "cache"  # a usage event's `host` when the edge's response cache answered (docs/cache.md)


class Origin(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The edge's note of who asked (header `Llmbus-Origin`), copied by workers into `UsageEvent`.

    Never the API key: `key_id` is the first 12 hex digits of its SHA-256, as in `infra/tenants.toml`.
    """

    tenant: str = ""
    key_id: str = ""
    api: str = ""  # the HTTP dialect: `native`, `openai`, `ollama`, `tasks`
    model: str = ""  # the model the client asked for (`auto` or `route:NAME` when routed)
    route: str = ""  # the route a routed request took (set by whoever routed it)
    accepted_ms: int = 0  # Unix epoch milliseconds, when the edge accepted it
