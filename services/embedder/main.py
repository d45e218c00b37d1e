"""`llmbus embedder`: wiring only."""

from __future__ import annotations

import logging

from contracts import EmbedRequest, LlmbusError, subjects
from services.embedder.batcher import Batcher
from services.embedder.cache import EmbedCache
from services.embedder.handler import Embed
from services.runtime import bus, service
from services.runtime.backends import create_backend
from services.runtime.settings import Settings
from services.runtime.worker import Worker

log = logging.getLogger("llmbus.embedder")


class Embedder:
    """One embedder process: a backend client, the batcher, the cache, a worker on `llm.req.embed.>`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = create_backend(settings, settings.embed_url)
        self.batcher = Batcher(
            self.backend,
            max_batch=settings.embed_max_batch,
            max_wait_s=settings.embed_max_wait_ms / 1000,
            max_calls=settings.embed_max_calls,
            merge=settings.embed_batching,
        )

    async def start(self) -> None:
        try:
            version = await self.backend.version()
            log.info("embedding backend: %s %s at %s", self.settings.backend, version, self.backend.url)
        except LlmbusError as exc:
            log.warning("%s; requests will fail with backend_unavailable until it is up", exc.message)
        self.nc = await bus.connect_with_retry(self.settings, "llmbus-embedder")
        cache: EmbedCache | None = None
        if self.settings.embed_cache_ttl_s > 0:
            cache = EmbedCache(self.nc.jetstream(), self.settings)
            try:
                await cache.start()
            except Exception as exc:  # e.g. the bucket exists with a storage type that cannot change
                log.warning("embedding cache unavailable, running without it: %r", exc)
                cache = None
        self.worker = Worker(
            self.nc,
            self.settings,
            service="embedder",
            filter_subject=subjects.EMBED_SUBJECTS,
            request_type=EmbedRequest,
            handler=Embed(self.nc, self.batcher, cache, self.settings),
            # Many small requests in flight at once is what lets the batcher merge them.
            concurrency=self.settings.embed_concurrency,
            batch_filter_subject=subjects.BATCH_EMBED_SUBJECTS,  # batch lines, in slots left free
        )
        await self.worker.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.worker.stop(grace)
        await self.batcher.aclose()
        await self.nc.drain()
        await self.backend.aclose()


def main(settings: Settings) -> None:
    service.run(Embedder(settings), "embedder", settings)
