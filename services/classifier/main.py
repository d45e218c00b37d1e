"""`llmbus classifier`: wiring only.

A worker on `llm.req.route` (requests with `"model": "auto"` or `"route:NAME"`) and a NATS micro
service `llmbus-classify` answering `ClassifyRequest`s on `llm.classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats.micro
from nats.micro.request import Request as MicroRequest

from contracts import ErrorBody, ErrorCode, ErrorDetail, GenerateRequest, LlmbusError
from contracts.route import CLASSIFY_SUBJECT, ROUTE_SUBJECT, ClassifyRequest
from services.classifier.classify import Classify
from services.classifier.handler import RouteRequest
from services.classifier.inventory import Inventory, ListModels
from services.classifier.router import Router
from services.classifier.routes import RouteTable
from services.classifier.similarity import Similarity
from services.runtime import bus, service
from services.runtime.backends import Backend, EmbedResult, OpenAIBackend, create_backend
from services.runtime.backends.ollama_admin import OllamaAdmin
from services.runtime.handoff import Claims
from services.runtime.settings import Settings
from services.runtime.worker import Worker

log = logging.getLogger("llmbus.classifier")

_encode = msgspec.json.Encoder().encode
_decode_classify = msgspec.json.Decoder(ClassifyRequest).decode


class Classifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = RouteTable(settings.routes_file)
        self.backend = create_backend(settings)
        self.embed_backend = (
            create_backend(settings, settings.embed_url)
            if settings.embed_url != settings.generate_url
            else self.backend
        )
        self.admin: OllamaAdmin | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.concurrency)

    def _list_models(self) -> ListModels:
        if isinstance(self.backend, OpenAIBackend):
            return self.backend.models
        self.admin = OllamaAdmin(self.settings.generate_url, connect_timeout=2.0)
        admin = self.admin

        async def tags() -> list[str]:
            return [tag.name for tag in await admin.tags()]

        return tags

    async def _embed(self, model: str, texts: list[str]) -> EmbedResult:
        return await self.embed_backend.embed(model, texts)

    async def start(self) -> None:
        try:
            routes = self.table.current()
        except LlmbusError as exc:  # a broken routes file stops the start here, loudly
            raise SystemExit(f"classifier: {exc.message} (LLMBUS_ROUTES_FILE)") from None
        self.nc = await bus.connect_with_retry(self.settings, "llmbus-classifier")
        js = self.nc.jetstream()
        self.similarity = Similarity(self._embed)
        try:
            await self.similarity.warm(routes)
        except LlmbusError as exc:
            log.warning("route examples not embedded yet (%s); the first routed request will", exc.message)
        self.inventory = Inventory(js, self._list_models())
        await self.inventory.start()
        router = Router(self.table, self.similarity, self.inventory, self.backend)
        self.classify = Classify(self.table, self.similarity, self.backend)
        claims = Claims(js, ttl_s=self.settings.dedupe_window_s)
        bus.reconnects(self.nc).subscribe(claims.reopen)  # in memory: a restarted NATS lost it
        self.worker = Worker(
            self.nc,
            self.settings,
            service="classifier",
            filter_subject=ROUTE_SUBJECT,
            request_type=GenerateRequest,
            handler=RouteRequest(js, router, claims),
        )
        await self.worker.start()
        self.micro = await nats.micro.add_service(
            self.nc, name="llmbus-classify", version="0.1.0", description="score a text against labels"
        )
        await self.micro.add_endpoint(name="classify", subject=CLASSIFY_SUBJECT, handler=self._on_classify)

    async def _on_classify(self, request: MicroRequest) -> None:
        # nats.micro calls handlers one at a time: answer in a task so a slow LLM blocks no one.
        task = asyncio.create_task(self._answer(request))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, request: MicroRequest) -> None:
        async with self._slots:
            try:
                try:
                    classify_request = _decode_classify(request.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid classify request: {exc}") from None
                reply = await self.classify(classify_request)
            except asyncio.CancelledError:  # stopping: say so rather than leave the caller waiting
                await _respond_error(request, ErrorCode.BACKEND_UNAVAILABLE, "the classifier is stopping")
                raise
            except LlmbusError as exc:
                await _respond_error(request, exc.code, exc.message)
                return
            except Exception:
                log.exception("classify failed")
                await _respond_error(request, ErrorCode.INTERNAL, "internal error; see the classifier log")
                return
            await request.respond(_encode(reply))

    async def stop(self, grace: float | None = None) -> None:
        with contextlib.suppress(Exception):
            await self.micro.stop()
        await asyncio.gather(self.worker.stop(grace), self._finish_answers(grace))
        await self.inventory.stop()
        await self.nc.drain()
        await _close(self.backend, self.embed_backend)
        if self.admin is not None:
            await self.admin.aclose()

    async def _finish_answers(self, grace: float | None) -> None:
        if self._answering:
            await asyncio.wait(
                self._answering, timeout=self.settings.shutdown_grace_s if grace is None else grace
            )
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)


async def _respond_error(request: MicroRequest, code: ErrorCode, message: str) -> None:
    body = ErrorBody(ErrorDetail(code=code, message=message))
    await request.respond_error(str(code.http_status), message, data=_encode(body))


async def _close(*backends: Backend) -> None:
    for backend in dict.fromkeys(backends):
        await backend.aclose()


def main(settings: Settings) -> None:
    service.run(Classifier(settings), "classifier", settings)
