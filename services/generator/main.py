"""`llmbus generator`: wiring only."""

from __future__ import annotations

import hashlib
import logging
import re

from contracts import GenerateRequest, LlmbusError, subjects, validate_model
from services.generator.handler import Generate
from services.runtime import bus, service
from services.runtime.backends import create_backend
from services.runtime.settings import Settings
from services.runtime.transcript import recording_jobs
from services.runtime.worker import Worker

log = logging.getLogger("llmbus.generator")


def consumer(models: list[str]) -> tuple[str, list[str]]:
    """The durable name and filter subjects for `LLMBUS_GENERATE_MODELS`.

    Every model: the shared `generator` consumer on `llm.req.generate.>`. A set of models (one
    backend host's): a durable of its own, named after them, since consumers of the work-queue
    request stream must not overlap.
    """
    names = sorted(set(models))
    if not names:
        return "generator", [subjects.GENERATE_SUBJECTS]
    for name in names:
        try:
            validate_model(name)
        except LlmbusError as exc:
            raise SystemExit(f"invalid LLMBUS_GENERATE_MODELS: {exc.message}") from None
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", names[0])[:32]
    digest = hashlib.sha256(",".join(names).encode()).hexdigest()[:8]
    return f"generator-{slug}-{digest}", [subjects.generate_subject(name) for name in names]


class Generator:
    """One generator process: a backend client and a worker on the models it serves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.durable, self.filters = consumer(settings.generate_models)
        self.backend = create_backend(settings)

    async def start(self) -> None:
        try:
            version = await self.backend.version()
            log.info("model backend: %s %s at %s", self.settings.backend, version, self.backend.url)
        except LlmbusError as exc:
            log.warning("%s; requests will fail with backend_unavailable until it is up", exc.message)
        self.nc = await bus.connect_with_retry(self.settings, "llmbus-generator")
        self.worker = Worker(
            self.nc,
            self.settings,
            service="generator",
            filter_subject=self.filters,
            request_type=GenerateRequest,
            handler=Generate.from_settings(self.backend, self.settings),
            durable=self.durable,
            job_factory=recording_jobs(self.settings),  # prompts and answers for the ledger, if on
            # Its models' batch lane (`<durable>-batch`), taken from only with slots left free.
            batch_filter_subject=[subjects.batch_lane(f) for f in self.filters],
        )
        await self.worker.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.worker.stop(grace)
        await self.nc.drain()
        await self.backend.aclose()


def main(settings: Settings) -> None:
    service.run(Generator(settings), "generator", settings)
