"""`llmbus generator`: wiring only."""

from __future__ import annotations

import logging

from contracts import GenerateRequest, LlmbusError, subjects
from services.generator.handler import Generate
from services.runtime import bus, service
from services.runtime.backends import OllamaBackend
from services.runtime.settings import Settings
from services.runtime.worker import Worker

log = logging.getLogger("llmbus.generator")


class Generator:
    """One generator process: a backend client and a worker on `llm.req.generate.>`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = OllamaBackend(settings.ollama_url, connect_timeout=settings.backend_connect_timeout_s)

    async def start(self) -> None:
        try:
            version = await self.backend.version()
            log.info("model backend: Ollama %s at %s", version, self.backend.url)
        except LlmbusError as exc:
            log.warning("%s; requests will fail with backend_unavailable until it is up", exc.message)
        self.nc = await bus.connect(self.settings, "llmbus-generator")
        self.worker = Worker(
            self.nc,
            self.settings,
            service="generator",
            filter_subject=subjects.GENERATE_SUBJECTS,
            request_type=GenerateRequest,
            handler=Generate(self.backend),
        )
        await self.worker.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.worker.stop(grace)
        await self.nc.drain()
        await self.backend.aclose()


def main(settings: Settings) -> None:
    service.run(Generator(settings), "generator", settings.log_level)
