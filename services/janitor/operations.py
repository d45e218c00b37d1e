"""Pulls and creates: long operations that run as tasks and report through events.

A pull or create of a model runs as one task while the policy keeps running (a large model takes
minutes to download); more requesters of the same one just follow its events. Progress is sent at
most every `_PROGRESS_EVERY_S` per operation (Ollama sends many lines); the end is one `done` or
`error` event, and a failure is remembered on the model's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from contracts import ErrorCode, LlmbusError
from contracts.models import (
    ModelEvent,
    ModelInfo,
    Op,
    OpDone,
    OpError,
    OpProgress,
    Progress,
    StatusLine,
    canonical_model,
)
from services.janitor import desired as desired_state
from services.janitor import metrics, modelfile
from services.janitor.record import Failure, ModelRecord, Operation
from services.runtime.backends.model_admin import CreateSpec, ModelAdmin, Status, cannot

log = logging.getLogger("llmbus.janitor")

_PROGRESS_EVERY_S = 0.2  # progress events per operation at most this often (Ollama sends many)


class Keeper(Protocol):
    """What an operation needs of the janitor that runs it."""

    admin: ModelAdmin
    host: str
    clock: Callable[[], float]
    lock: asyncio.Lock

    def record(self, name: str) -> ModelRecord: ...

    def tagged(self, name: str) -> bool: ...

    def entry(self, name: str) -> ModelInfo | None: ...

    async def refresh(self) -> None: ...

    async def publish_inventory(self) -> None: ...

    async def event(self, event: ModelEvent, operation: Operation | None = None) -> None: ...


class Operations:
    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper

    def start_pull(self, model: str, progress: str | None = None) -> Operation:
        admin = self.keeper.admin
        if not admin.supports("pull"):
            raise cannot("pull", admin.url)
        return self._start("pull", canonical_model(model), progress, lambda: self._pull_steps(model))

    def start_create(
        self,
        model: str,
        text: str,
        path: Path | None = None,
        progress: str | None = None,
        spec: CreateSpec | None = None,  # already parsed (admin.py), `text` then names it
    ) -> Operation:
        admin = self.keeper.admin
        if not admin.supports("create"):
            raise cannot("create", admin.url)
        name = canonical_model(model)
        spec = spec or modelfile.parse(text, path.parent if path is not None else None)  # bad input fails now
        digest = desired_state.ModelSpec(name=name, modelfile=text).modelfile_digest
        assert digest is not None
        return self._start("create", name, progress, lambda: self._create_steps(name, spec, digest))

    def _start(
        self, op: Op, name: str, progress: str | None, steps: Callable[[], AsyncIterator[Status]]
    ) -> Operation:
        record = self.keeper.record(name)
        running = record.op
        if running is not None:
            if running.op != op:
                raise busy(running)
            if progress:
                running.subscribers.append(progress)
            return running
        operation = Operation(op=op, model=name, subscribers=[progress] if progress else [])
        record.op = operation
        operation.task = asyncio.create_task(self._operate(record, operation, steps))
        return operation

    async def _operate(
        self, record: ModelRecord, operation: Operation, steps: Callable[[], AsyncIterator[Status]]
    ) -> None:
        keeper = self.keeper
        name, op, host = operation.model, operation.op, keeper.host
        layers: dict[str, tuple[int, int]] = {}
        last_sent = 0.0
        log.info("%s %s started", op, name)
        try:
            with contextlib.suppress(Exception):
                async with keeper.lock:  # `pulling` at once: the edge answers "retry" meanwhile
                    await keeper.publish_inventory()
            async for status in steps():
                if status.digest and status.total:
                    layers[status.digest] = (status.completed, status.total)
                operation.progress = Progress(
                    status=status.status,
                    completed=sum(c for c, _ in layers.values()),
                    total=sum(t for _, t in layers.values()),
                )
                now = time.monotonic()
                if now - last_sent >= _PROGRESS_EVERY_S or status.completed in (0, status.total):
                    last_sent = now
                    line = StatusLine(status.status, status.digest, status.total, status.completed)
                    progress = OpProgress(
                        host=host, model=name, op=op, progress=operation.progress, line=line
                    )
                    await keeper.event(progress, operation)
            record.failed = None
            async with keeper.lock:
                with contextlib.suppress(LlmbusError):
                    await keeper.refresh()
                record.op = None
                await keeper.publish_inventory()
            log.info("%s %s done", op, name)
            metrics.OPERATIONS.labels(op, "ok").inc()
            await keeper.event(OpDone(host=host, model=name, op=op, info=keeper.entry(name)), operation)
        except Exception as exc:
            error = exc if isinstance(exc, LlmbusError) else LlmbusError(ErrorCode.INTERNAL, repr(exc))
            if not isinstance(exc, LlmbusError):
                log.error("%s %s failed", op, name, exc_info=exc)
            else:
                log.warning("%s %s failed: %s", op, name, error.message)
            record.op = None
            record.failed = Failure(error.message, keeper.clock())
            metrics.OPERATIONS.labels(op, "error").inc()
            with contextlib.suppress(Exception):
                async with keeper.lock:
                    await keeper.publish_inventory()
            failed = OpError(host=host, model=name, op=op, code=error.code, message=error.message)
            await keeper.event(failed, operation)
        finally:
            operation.done.set()

    async def _pull_steps(self, model: str) -> AsyncIterator[Status]:
        async for status in self.keeper.admin.pull(model):
            yield status

    async def _create_steps(self, name: str, spec: CreateSpec, digest: str) -> AsyncIterator[Status]:
        admin = self.keeper.admin
        if spec.from_ and not self.keeper.tagged(canonical_model(spec.from_)):
            # Ollama would pull the base itself; doing it here shows its progress too.
            async for status in admin.pull(spec.from_):
                yield msgspec.structs.replace(status, status=f"{spec.from_}: {status.status}")
        async for status in admin.create(name, spec):
            yield status
        self.keeper.record(name).created = digest


def busy(operation: Operation) -> LlmbusError:
    doing = "pulled" if operation.op == "pull" else "created"
    return LlmbusError(ErrorCode.BAD_REQUEST, f"model {operation.model!r} is being {doing} right now")
