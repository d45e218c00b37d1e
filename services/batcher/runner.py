"""Runs one batch to its end: every line as an ordinary request on the bus, each finished line kept
in KV at once, then the output and error files.

Resuming is the same code as starting: the lines already in KV are skipped, and a line that was
running is submitted again under the same request id, which attaches to its earlier run (its
`accepted` record in LLM_OUT, or `Nats-Msg-Id` de-duplication) instead of running it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from contracts import (
    Completion,
    EmbedRequest,
    EmbedResponse,
    Error,
    Event,
    GenerateRequest,
    LlmbusError,
    subjects,
)
from contracts.batches import BATCH_API, Batch, BatchError, BatchErrors, LineResult, RequestCounts
from contracts.embed import Embeddings, Vectors
from contracts.route import is_routed
from contracts.usage import Origin
from services.batcher.lines import Line, answered, count, expired, parse
from services.edge.dispatch import Dispatcher
from services.edge.feed import EventFeed
from services.edge.generation import collect
from services.edge.images import shrink
from services.edge.tenants import ANONYMOUS, Tenant
from services.runtime.batch_store import BatchStore
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.batcher")

_decode_event = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.Encoder().encode

TICK_S = 0.5  # how often progress is written and a cancel looked for
RETRY_S = 1.0  # a line refused for now (queue full, NATS away) is submitted again after this ...
MAX_RETRY_S = 30.0  # ... or after the refusal's retry_after (a rate limit, a spent budget), this at most
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})


class BatchRun:
    def __init__(
        self,
        store: BatchStore,
        dispatcher: Dispatcher,
        settings: Settings,
        batch_id: str,
        owner: Callable[[str], Tenant],
    ) -> None:
        self.store = store
        self.owner = owner  # a tenant's name -> the tenant (its models and limits)
        self.tenant = ANONYMOUS
        self.dispatcher = dispatcher
        self.settings = settings
        self.batch_id = batch_id
        self.results: dict[int, LineResult] = {}
        self.cancelled = False  # no more lines start (cancelled, or expired)
        self.expired = False  # the completion window ended first: unfinished lines are `batch_expired`
        self.lines: list[Line] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, heartbeat: Callable[[], Awaitable[None]]) -> None:
        batch = await self.store.batch(self.batch_id)
        if batch.status in TERMINAL:
            return
        self.tenant = self.owner(batch.tenant)  # the lines run as the batch's owner
        data = await self.store.files.get(batch.input_file_id)
        content = data.data or b""
        if count(content) > self.settings.batch_max_lines:
            await self._fail(f"the input file has more than {self.settings.batch_max_lines} lines")
            return
        lines, bad = parse(batch.id, batch.endpoint, content)
        self.lines = lines
        if not lines and not bad:
            await self._fail("the input file has no lines")
            return
        self.results = {**bad, **await self.store.finished_lines(batch.id)}
        for index, result in bad.items():
            await self.store.put_line(batch.id, index, result)
        total = len(lines) + len(bad)
        now = int(time.time())

        def started(b: Batch) -> Batch | None:
            if b.status != "validating":
                return None
            return msgspec.structs.replace(b, status="in_progress", in_progress_at=now)

        batch = await self.store.update_batch(batch.id, started)
        todo = [line for line in lines if line.index not in self.results]
        log.info("batch %s: %d lines, %d to run", batch.id, total, len(todo))
        self.expired = self.cancelled = time.time() >= batch.expires_at  # it waited out its window
        ticker = asyncio.create_task(self._tick(total, heartbeat))
        try:
            if batch.status != "cancelling" and not self.expired:
                await self._run_lines(batch.endpoint, todo)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await self._finish(batch.endpoint, total)

    async def _run_lines(self, endpoint: str, todo: list[Line]) -> None:
        limit = asyncio.Semaphore(self.settings.batch_concurrency)

        async def one(line: Line) -> None:
            async with limit:
                if self.cancelled:
                    return
                result = answered(line, endpoint, await self._answer(line))
                await self.store.put_line(self.batch_id, line.index, result)
                self.results[line.index] = result

        self._tasks = [asyncio.create_task(one(line)) for line in todo]
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _answer(self, line: Line) -> Completion | EmbedResponse | Error:
        request = line.request
        if isinstance(request, GenerateRequest):  # its images shrunk, as the edge does (LLMBUS_IMAGE_*)
            try:
                request, _ = await shrink(self.settings, request)
            except LlmbusError as exc:  # not a readable image: this line's error
                return Error(seq=0, attempt=0, code=exc.code, message=exc.message)
        # The batch lane: workers take a line only with a slot no interactive request waits for.
        if isinstance(request, EmbedRequest):
            subject = subjects.batch_lane(subjects.embed_subject(request.model))
        elif is_routed(request.model):
            subject = ""  # the classifier's queue; it hands a line on to the batch lane (its origin's api)
        else:
            subject = subjects.batch_lane(subjects.generate_subject(request.model))
        while True:
            try:
                feed = await self.dispatcher.submit(
                    request,
                    subject=subject,
                    tenant=self.tenant,
                    origin=Origin(tenant=self.tenant.name, api=BATCH_API),
                    idempotent=True,
                    detached=True,
                )
                break
            except LlmbusError as exc:
                if exc.retry_after is None:  # refused for good (unknown model, too large): its error
                    return Error(seq=0, attempt=0, code=exc.code, message=exc.message)
                # Refused for now: the owner's rate limits and budget count a batch's lines as any
                # request, so a batch over them waits (until it ends by its window: `expire`).
                await asyncio.sleep(min(max(exc.retry_after, RETRY_S), MAX_RETRY_S))
        try:
            if isinstance(request, EmbedRequest):
                return await _embeddings(feed)
            return await collect(feed, request.model)
        except asyncio.CancelledError:
            feed.cancel()  # the batch was cancelled: so is its running line
            raise
        finally:
            feed.close()

    async def _tick(self, total: int, heartbeat: Callable[[], Awaitable[None]]) -> None:
        """Progress into the record; a cancel out of it; the work-queue message kept ours."""
        while True:
            await asyncio.sleep(TICK_S)
            counts = self._counts(total)

            def progressed(b: Batch, counts: RequestCounts = counts) -> Batch | None:
                return (
                    None if b.request_counts == counts else msgspec.structs.replace(b, request_counts=counts)
                )

            batch = await self.store.update_batch(self.batch_id, progressed)
            if not self.cancelled and (batch.status == "cancelling" or time.time() >= batch.expires_at):
                self.expired = batch.status != "cancelling"
                self.cancelled = True
                for task in self._tasks:
                    task.cancel()  # running lines are cancelled on the bus too (`_answer`)
            await heartbeat()

    def _counts(self, total: int) -> RequestCounts:
        ok = sum(1 for result in self.results.values() if result.ok)
        return RequestCounts(total=total, completed=ok, failed=len(self.results) - ok)

    async def _finish(self, endpoint: str, total: int) -> None:
        now = int(time.time())
        batch = await self.store.update_batch(
            self.batch_id,
            lambda b: (
                msgspec.structs.replace(b, finalizing_at=now)
                if b.status == "cancelling"
                else msgspec.structs.replace(b, status="finalizing", finalizing_at=now)
            ),
        )
        if self.expired and batch.status != "cancelling":  # a cancel asked for first wins
            for line in self.lines:
                if line.index not in self.results:
                    self.results[line.index] = expired(line)
        ordered = [self.results[index] for index in sorted(self.results)]
        output = b"".join(_encode(r.record) + b"\n" for r in ordered if r.ok)
        errors = b"".join(_encode(r.record) + b"\n" for r in ordered if not r.ok)
        # Ids derived from the batch's: finishing again after a crash replaces, never adds, a file.
        stem = self.batch_id.removeprefix("batch-")
        keep = batch.output_expires_s
        out = await self.store.put_file(
            batch.tenant,
            f"{self.batch_id}_output.jsonl",
            "batch_output",
            output,
            f"file-out-{stem}",
            expires_s=keep,
        )
        err = None
        if errors:
            err = await self.store.put_file(
                batch.tenant,
                f"{self.batch_id}_error.jsonl",
                "batch_output",
                errors,
                f"file-err-{stem}",
                expires_s=keep,
            )
        counts = self._counts(total)
        done = int(time.time())

        def finished(b: Batch) -> Batch:
            common = {
                "output_file_id": out.id,
                "error_file_id": err.id if err else None,
                "request_counts": counts,
            }
            if b.status == "cancelling":
                return msgspec.structs.replace(b, status="cancelled", cancelled_at=done, **common)
            if self.expired:
                return msgspec.structs.replace(b, status="expired", expired_at=done, **common)
            return msgspec.structs.replace(b, status="completed", completed_at=done, **common)

        batch = await self.store.update_batch(self.batch_id, finished)
        log.info("batch %s %s: %d ok, %d failed", batch.id, batch.status, counts.completed, counts.failed)

    async def _fail(self, message: str) -> None:
        now = int(time.time())
        errors = BatchErrors(data=[BatchError(code="invalid_file", message=message)])
        await self.store.update_batch(
            self.batch_id, lambda b: msgspec.structs.replace(b, status="failed", failed_at=now, errors=errors)
        )
        log.info("batch %s failed: %s", self.batch_id, message)


async def _embeddings(feed: EventFeed) -> EmbedResponse | Error:
    vectors: list[list[float]] = []
    async for batch in feed.batches():
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Vectors):
                vectors += event.embeddings
            elif isinstance(event, Embeddings):
                return EmbedResponse(
                    request_id=feed.request_id,
                    model=event.model,
                    embeddings=vectors + event.embeddings,
                    usage=event.usage,
                    timings=event.timings,
                )
            elif isinstance(event, Error):
                return event
    raise RuntimeError("event feed ended without a terminal event")
