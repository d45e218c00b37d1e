"""The worker's deadline and cancel stage.

Every request has a deadline (the worker's `request_timeout_s`, earlier when its `Llmbus-Deadline`
header says so), and a running handler is stopped at it. A cancel (`llm.cancel.<id>`) stops a
running job's task (closing its upstream call, so the model server stops); one that arrives before
its request is remembered, so the request ends with `cancelled` when it comes. A request whose
deadline passed, or that was cancelled, before it started is never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic

from contracts import ErrorCode, headers
from services.runtime.worker_job import Handler, Job, R

# Cancels remembered for requests that have not arrived (the oldest are forgotten first).
EARLY_CANCELS = 10_000


def deadline_of(hdrs: dict[str, str], timeout_s: float, now: float) -> float:
    """The request's deadline in event-loop time (`now`), from its `Llmbus-Deadline` (Unix ms)."""
    deadline = now + timeout_s
    if headers.DEADLINE in hdrs:
        with contextlib.suppress(ValueError):
            deadline = min(deadline, now + int(hdrs[headers.DEADLINE]) / 1000 - time.time())
    return deadline


class Running(Generic[R]):
    """The jobs this worker runs now, by request id, and the cancels that came before their request."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job[R]] = {}
        self._early: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job[R]]:
        return iter(list(self._jobs.values()))

    def get(self, request_id: str) -> Job[R] | None:
        return self._jobs.get(request_id)

    def add(self, job: Job[R]) -> None:
        self._jobs[job.id] = job

    def remove(self, job: Job[R]) -> None:
        del self._jobs[job.id]

    def cancel(self, request_id: str) -> None:
        """The client cancelled: stop its job, or remember it for when the request arrives."""
        job = self._jobs.get(request_id)
        if job is not None:
            job.cancel("client")
            return
        self._early[request_id] = None
        if len(self._early) > EARLY_CANCELS:
            self._early.popitem(last=False)

    def cancelled_early(self, request_id: str) -> bool:
        return request_id in self._early


async def refuse_unstartable(job: Job[R], running: Running[R]) -> bool:
    """Ends a request that was cancelled or expired before it started; True if it did."""
    if running.cancelled_early(job.id):
        await job.fail(ErrorCode.CANCELLED, "cancelled by the client before it started")
        return True
    if job.deadline <= asyncio.get_running_loop().time():
        await job.fail(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started")
        return True
    return False


async def within_deadline(handler: Handler[R], job: Job[R]) -> None:
    """The handler, stopped at the request's deadline (TimeoutError)."""
    async with asyncio.timeout_at(job.deadline):
        await handler(job)
