"""`llmbus provision`: creates the streams and brings existing ones to the current settings.

Services create what is missing themselves (at start and after a NATS reconnect) but may not
change or remove a stream: their NATS users lack those rights (services/runtime/nats_roles.py).
Changing a stream's configuration (say `LLMBUS_EVENT_MAX_AGE_S`) is this step, run as the `admin`
user: `llmbus up` runs it before it starts the services; with compose, run it once after changing
such a setting (`docker compose run --rm edge provision`).
"""

from __future__ import annotations

import asyncio

from services.edge.cache_store import cache_stream as response_cache_stream
from services.embedder.cache import cache_stream
from services.runtime import bus
from services.runtime.settings import Settings


async def provision(settings: Settings) -> list[str]:
    """Creates or updates every stream llmbus uses; returns their names."""
    nc = await bus.connect(settings, "llmbus-admin", role="admin")
    try:
        js = nc.jetstream()
        await bus.provision(js, settings, update=True)
        streams = [config.name or "" for config in bus.stream_configs(settings)]
        if settings.embed_cache_ttl_s > 0:
            cache = cache_stream(settings)
            await bus.ensure_stream(js, cache, update=True)
            streams.append(cache.name or "")
        answers = response_cache_stream(settings)  # the edge's response cache (docs/cache.md)
        await bus.ensure_stream(js, answers, update=True)
        streams.append(answers.name or "")
        return streams
    finally:
        await nc.close()


def main(settings: Settings) -> int:
    streams = asyncio.run(provision(settings))
    print(f"provisioned {', '.join(streams)} at {bus.display_url(settings.nats_url)}")
    return 0
