"""Seed 000's API (the DCC badge generator), over the `badge` task (infra/tasks/badge.toml).

`POST /api/v1/generate` and `/api/v1/generate/stream` take the seed's `content` and sampling knobs;
the answer is the seed's `{"response": {badge_name, badge_description, criteria, ...}, "model",
"usage"}` and its stream the seed's `data: {"type": "token", "content", "accumulated", "done"}`
lines ending with one `{"type": "final", ...}` (or `{"type": "error", ...}`). The task's validation
and retry stand behind it: a `final` always carries a valid Open Badges 3.0 Achievement, which is
also given whole as `response.achievement`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Redirect

from contracts import ErrorCode, GenerateRequest, LlmbusError, Options
from services.edge.dialects.common import sse_data
from services.edge.serve import Answer, Piped
from services.edge.tasks import Catalog, Tasking, TaskResult
from services.runtime.events import RawEvent
from services.runtime.inventory import InventoryView

TASK = "badge"

_encode = msgspec.json.Encoder().encode


class BadgeBody(msgspec.Struct, kw_only=True):
    content: str
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None

    def options(self, defaults: Options) -> Options:
        asked = {
            "temperature": self.temperature,
            "num_predict": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
        }
        return msgspec.structs.replace(defaults, **{k: v for k, v in asked.items() if v is not None})


def badge(achievement: dict[str, Any]) -> dict[str, Any]:
    """The seed's `response` object from an OB 3.0 Achievement."""
    return {
        "badge_name": achievement.get("name"),
        "badge_description": achievement.get("description"),
        "criteria": achievement.get("criteria"),
        "achievement": achievement,
    }


class Badges(Tasking):
    def __init__(self, *args: Any, model: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = model
        self.accumulated = ""

    def frame(self, batch: list[RawEvent]) -> bytes:
        out: list[bytes] = []
        for head, data in batch:
            event = msgspec.json.decode(data)
            if head.type == "token":
                self.accumulated += event["text"]
                out.append(
                    sse_data(
                        {
                            "type": "token",
                            "content": event["text"],
                            "accumulated": self.accumulated,
                            "done": False,
                        }
                    )
                )
            elif head.type in ("restart", "retry"):  # a new attempt: its tokens accumulate anew
                self.accumulated = ""
            elif head.type == "routed":
                self.model = event["model"]
            elif head.type == "done":
                final = {"type": "final", "content": badge(event["output"]), "model": self.model}
                out.append(sse_data(final | {"usage": event["usage"], "done": True}))
            elif head.type == "error":
                out.append(
                    sse_data(
                        {"type": "error", "error": event["message"], "code": event["code"], "done": True}
                    )
                )
        return b"".join(out)

    def answer(self, result: TaskResult, request_id: str) -> Response[bytes]:
        body = {"response": badge(result.output), "model": result.model, "usage": result.usage}
        return Response(_encode(body), media_type="application/json", headers={"X-Request-Id": request_id})


async def _badge(data: BadgeBody, pipeline: Piped, tasks: Catalog, *, streams: bool) -> Answer:
    task = tasks.get(TASK)
    if task is None:
        raise LlmbusError(ErrorCode.NOT_FOUND, f"the badges dialect needs the {TASK!r} task (infra/tasks)")
    request_id = pipeline.request_id
    prepared = task.prepare({"content": data.content}, request_id)
    wire = GenerateRequest(
        id=request_id,
        model=task.model,
        messages=prepared.messages,
        options=data.options(task.options),
        format=prepared.format,
    )
    return await pipeline.serve(wire, Badges(TASK, prepared, streams=streams, model=task.model))


@post("/api/v1/generate", summary="Seed 000: generate a badge", status_code=200, tags=["badges"])
async def generate(data: JSONBody[BadgeBody], pipeline: Piped, tasks: Catalog) -> Answer:
    return await _badge(data, pipeline, tasks, streams=False)


@post("/api/v1/generate/stream", summary="Seed 000: generate a badge (SSE)", status_code=200, tags=["badges"])
async def generate_stream(data: JSONBody[BadgeBody], pipeline: Piped, tasks: Catalog) -> Answer:
    return await _badge(data, pipeline, tasks, streams=True)


@get("/api/v1/health", summary="Seed 000: health", tags=["badges"])
async def health(tasks: Catalog, inventory: NamedDependency[InventoryView | None]) -> dict[str, Any]:
    task = tasks.get(TASK)
    model = task.model if task is not None else None
    if model is None:
        available = False
    elif inventory is None or not inventory.populated:
        available = True  # no janitor lists models: the edge does not check them either
    else:
        available = any(info.ready for info in inventory.lookup(model))
    return {"status": "healthy", "model": model, "model_available": available}


@get("/docs", summary="Seed 000: interactive API documentation", tags=["badges"], include_in_schema=False)
async def docs() -> Redirect:
    return Redirect("/schema/swagger")


ROUTES = [generate, generate_stream, health, docs]
