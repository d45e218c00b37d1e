"""`GET /v1/tasks` and `POST /v1/tasks/{name}`: structured generation through the normal bus path.

A task request becomes one ordinary chat request on the bus, with the task's output schema as
`format`; its events are relayed as they come (start, routed, token...), except the worker's `done`,
which the edge replaces with one that carries the parsed, validated `output`. An answer that does
not validate is retried once as a new request, the model's answer and the validation error appended
to the conversation; a `retry` event separates the attempts in the stream. A second failure ends
the stream with `invalid_output`, whose message quotes the raw text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from contracts import (
    Done,
    Error,
    ErrorCode,
    EventHead,
    GenerateRequest,
    LlmbusError,
    Message,
    Options,
    Timings,
    Token,
    Usage,
)
from services.edge.bodies import Timeout
from services.edge.dispatch import Dispatcher
from services.edge.feed import EventFeed
from services.edge.serve import Answer, Dialect, Piped, Source, Wire
from services.edge.task_catalog import InvalidOutput, Prepared, Task, TaskInfo
from services.runtime.events import RawEvent

_encode = msgspec.json.Encoder().encode
_decode_token = msgspec.json.Decoder(Token).decode
_decode_done = msgspec.json.Decoder(Done).decode
_decode_error = msgspec.json.Decoder(Error).decode

ATTEMPTS = 2  # the first answer, and one retry with the validation error in the prompt
_RAW_QUOTE = 4000  # characters of the raw answer quoted in `invalid_output`


class TaskBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    input: dict[str, Any]  # the task's input fields, checked against its `input_schema`
    model: str | None = None  # default: the task's model
    options: Options | None = None  # each option set here replaces the task's default
    stream: bool = False
    timeout: Timeout | None = None


class TaskList(msgspec.Struct):
    tasks: list[TaskInfo]


class TaskRetry(msgspec.Struct, tag_field="type", tag="retry"):
    """Between two attempts: why the first answer was refused, and the id of the new request."""

    request_id: str
    reason: str


class TaskResult(msgspec.Struct, omit_defaults=True):
    """The non-streaming answer of a task."""

    request_id: str  # of the accepted attempt
    task: str
    model: str
    output: Any
    text: str  # the model's raw answer
    attempts: int
    finish_reason: str
    usage: Usage
    timings: Timings


Tasks = dict[str, Task]
Catalog = NamedDependency[Tasks]  # the task files, loaded at start (services/edge/task_catalog.py)


@get("/v1/tasks", summary="List tasks with their input and output schemas")
async def list_tasks(tasks: Catalog) -> TaskList:
    return TaskList([task.info for task in tasks.values()])


@get("/v1/tasks/{name:str}", summary="One task with its input and output schemas")
async def show_task(name: FromPath[str], tasks: Catalog) -> TaskInfo:
    return _task(tasks, name).info


class Tasking(Dialect):
    """The native dialect over a task's attempts (`_TaskRun`), answering a `TaskResult`."""

    def __init__(self, name: str, prepared: Prepared, *, streams: bool) -> None:
        self.name = name
        self.prepared = prepared
        self.streams = streams

    async def open(self, dispatcher: Dispatcher, wire: Wire, submit: dict[str, Any]) -> Source:
        assert isinstance(wire, GenerateRequest)
        run = _TaskRun(dispatcher, self.prepared, wire, submit)
        await run.submit()  # before answering: an unavailable queue is an HTTP error, not a stream
        return run

    async def collect(self, source: Source) -> TaskResult | Error:
        assert isinstance(source, _TaskRun)
        return await _collect(source, self.name)


@post(
    "/v1/tasks/{name:str}",
    summary="Run a task: stream tokens, end with the validated object",
    status_code=200,
)
async def run_task(name: FromPath[str], data: JSONBody[TaskBody], pipeline: Piped, tasks: Catalog) -> Answer:
    task = _task(tasks, name)
    request_id = pipeline.request_id
    prepared = task.prepare(data.input, request_id)
    options = task.options
    if data.options is not None:
        options = msgspec.structs.replace(options, **_set_fields(data.options))
    wire = GenerateRequest(
        id=request_id,
        model=data.model or task.model,
        messages=prepared.messages,
        options=options,
        format=prepared.format,
    )
    streams = data.stream or pipeline.accepts_events
    return await pipeline.serve(wire, Tasking(name, prepared, streams=streams), timeout_s=data.timeout)


def _task(tasks: Tasks, name: str) -> Task:
    task = tasks.get(name)
    if task is None:
        raise LlmbusError(ErrorCode.NOT_FOUND, f"no task {name[:64]!r}; GET /v1/tasks lists them")
    return task


def _set_fields(options: Options) -> dict[str, Any]:
    return {f: v for f in options.__struct_fields__ if (v := getattr(options, f)) is not None}


class _TaskRun:
    """Up to two bus requests for one task request; `close` cancels whichever is running."""

    def __init__(
        self, dispatcher: Dispatcher, prepared: Prepared, wire: GenerateRequest, submit: dict[str, Any]
    ):
        self.dispatcher = dispatcher
        self.prepared = prepared
        self.wire = wire
        self.request_id = wire.id  # the task request's (the answer's X-Request-Id)
        self.submit_as = {k: v for k, v in submit.items() if k != "timeout_s"}  # the tenant
        timeout = submit.get("timeout_s")
        timeout = min(timeout or dispatcher.max_timeout_s, dispatcher.max_timeout_s)
        self.deadline = asyncio.get_running_loop().time() + timeout  # one deadline for every attempt
        self.feed: EventFeed | None = None
        self.attempt = 1
        self.text = ""

    async def submit(self) -> None:
        if self.feed is not None:
            self.feed.close()  # the previous attempt ended: this only unsubscribes
        remaining = max(self.deadline - asyncio.get_running_loop().time(), 0.001)
        self.feed = await self.dispatcher.submit(self.wire, remaining, **self.submit_as)

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        """The relayed events of every attempt, ending with one terminal event (done or error)."""
        while True:
            assert self.feed is not None
            parts: list[str] = []
            done: tuple[EventHead, Done] | None = None
            async for batch in self.feed.batches():
                out: list[RawEvent] = []
                for head, data in batch:
                    if head.type == "token":
                        parts.append(_decode_token(data).text)
                    elif head.type == "restart":  # the text so far is void: a new worker starts over
                        parts.clear()
                    elif head.type == "done":
                        done = (head, _decode_done(data))
                        continue
                    out.append((head, data))
                if out:
                    yield out
            if done is None:
                return  # an error event, already relayed, ended the request
            head, event = done
            self.text = "".join(parts)
            try:
                output = self.prepared.accept(self.text, truncated=event.finish_reason == "length")
            except InvalidOutput as exc:
                if self.attempt >= ATTEMPTS:
                    yield [_invalid_output(head, event, str(exc), self.text)]
                    return
                yield [self._retry(str(exc))]
                try:
                    await self.submit()
                except LlmbusError as failure:  # the stream has begun: the failure is its last event
                    error = Error(
                        seq=-1,
                        attempt=0,
                        code=failure.code,
                        message=failure.message,
                        retry_after=failure.retry_after,
                    )
                    yield [(EventHead(type="error", seq=-1), _encode(error))]
                    return
                continue
            yield [(head, _encode(msgspec.structs.replace(event, output=output)))]
            return

    def _retry(self, reason: str) -> RawEvent:
        self.attempt += 1
        self.wire = msgspec.structs.replace(
            self.wire,
            id=f"{self.wire.id[:120]}-r{self.attempt}",
            messages=[
                *(self.wire.messages or []),
                Message(role="assistant", content=self.text),
                Message(
                    role="user",
                    content=f"That answer is invalid: {reason}. Answer again with only the corrected JSON.",
                ),
            ],
        )
        return EventHead(type="retry", seq=-1), _encode(TaskRetry(request_id=self.wire.id, reason=reason))


def _invalid_output(head: EventHead, done: Done, reason: str, text: str) -> RawEvent:
    quoted = text if len(text) <= _RAW_QUOTE else text[:_RAW_QUOTE] + "…"
    error = Error(
        seq=head.seq,
        attempt=done.attempt,
        code=ErrorCode.INVALID_OUTPUT,
        message=f"the model's answer does not match the task's output schema after {ATTEMPTS} attempts: "
        f"{reason}; raw output: {quoted}",
    )
    return EventHead(type="error", seq=head.seq), _encode(error)


async def _collect(run: _TaskRun, name: str) -> TaskResult | Error:
    model = run.wire.model
    async for batch in run.batches():
        for head, data in batch:
            if head.type == "routed":
                model = msgspec.json.decode(data)["model"]
            elif head.type == "done":
                done = _decode_done(data)
                return TaskResult(
                    request_id=run.wire.id,
                    task=name,
                    model=model,
                    output=done.output,
                    text=run.text,
                    attempts=run.attempt,
                    finish_reason=done.finish_reason,
                    usage=done.usage,
                    timings=done.timings,
                )
            elif head.type == "error":
                return _decode_error(data)
    raise RuntimeError("task events ended without a terminal event")  # `batches` always ends with one
