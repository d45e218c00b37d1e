"""A batch's lines: parsed from the input file into bus requests, and their answers shaped as the
records of OpenAI's output and error files.

Line parsing reuses the OpenAI-compatible API's own request bodies, so a line means exactly what
the same body posted to `/openai/v1/...` means. A line that cannot run (bad JSON, another
endpoint, a duplicate `custom_id`, an invalid body) goes to the error file; the rest run.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from contracts import Completion, EmbedRequest, EmbedResponse, Error, ErrorCode, GenerateRequest, LlmbusError
from contracts.batches import NATIVE_ENDPOINTS, InputLine, LineResult
from services.edge.bodies import ChatBody, GenerateBody
from services.edge.compat.openai_bodies import ChatCompletionBody, CompletionBody, EmbeddingsBody
from services.edge.embed import EmbedBody

_decode_line = msgspec.json.Decoder(InputLine).decode
_NATIVE = frozenset(NATIVE_ENDPOINTS)
Body = ChatCompletionBody | CompletionBody | EmbeddingsBody | ChatBody | GenerateBody | EmbedBody
_BODIES: dict[str, type[Body]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingsBody,
    # The native API's (`POST /v1/batches`): answered with the native objects.
    "/v1/chat": ChatBody,
    "/v1/generate": GenerateBody,
    "/v1/embed": EmbedBody,
}


class Line(msgspec.Struct, kw_only=True):
    index: int
    custom_id: str
    request: GenerateRequest | EmbedRequest


def line_request_id(batch_id: str, index: int) -> str:
    """A line's request id, the same on every run: its `Nats-Msg-Id`, so a resumed batch attaches
    to a line's earlier run instead of running it twice."""
    return f"{batch_id}-{index}"


def parse(batch_id: str, endpoint: str, data: bytes) -> tuple[list[Line], dict[int, LineResult]]:
    """The lines that can run, and an error-file record for each that cannot (by line index)."""
    lines: list[Line] = []
    bad: dict[int, LineResult] = {}
    seen: set[str] = set()
    for index, raw in enumerate(part for part in data.splitlines() if part.strip()):
        custom_id = ""
        try:
            line = _decode_line(raw)
            custom_id = line.custom_id
            if custom_id in seen:
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
            if line.method.upper() != "POST":
                raise LlmbusError(ErrorCode.BAD_REQUEST, "`method` must be POST")
            if line.url != endpoint:
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"`url` must be the batch's endpoint {endpoint}")
            body = msgspec.convert(line.body, _BODIES[endpoint])
            if getattr(body, "stream", False):
                raise LlmbusError(ErrorCode.BAD_REQUEST, "`stream` is not supported in a batch")
            request = _request(body, line_request_id(batch_id, index))
            request.validate()
            lines.append(Line(index=index, custom_id=custom_id, request=request))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad[index] = invalid(batch_id, index, custom_id, f"line {index + 1}: {exc}")
        except LlmbusError as exc:
            bad[index] = invalid(batch_id, index, custom_id, f"line {index + 1}: {exc.message}")
    return lines, bad


def _request(body: Body, request_id: str) -> GenerateRequest | EmbedRequest:
    if isinstance(body, EmbedBody):
        fields = msgspec.structs.asdict(body)
        del fields["timeout"]  # a line's deadline is the batcher's
        return EmbedRequest(id=request_id, **fields)
    return body.to_request(request_id)


def count(data: bytes) -> int:
    return sum(1 for part in data.splitlines() if part.strip())


def invalid(batch_id: str, index: int, custom_id: str, message: str) -> LineResult:
    """A line that never ran: OpenAI's error-file record with `response: null`."""
    return LineResult(
        ok=False,
        record={
            "id": f"batch_req_{line_request_id(batch_id, index)}",
            "custom_id": custom_id or None,
            "response": None,
            "error": {"code": "invalid_request", "message": message},
        },
    )


def expired(line: Line) -> LineResult:
    """A line the batch's completion window ended before: OpenAI's `batch_expired` error record."""
    return LineResult(
        ok=False,
        record={
            "id": f"batch_req_{line.request.id}",
            "custom_id": line.custom_id,
            "response": None,
            "error": {
                "code": "batch_expired",
                "message": "This line could not be run before the batch's completion window expired.",
            },
        },
    )


def answered(line: Line, endpoint: str, result: Completion | EmbedResponse | Error) -> LineResult:
    """A line that ran: its response (status 200 and the endpoint's object), or its error."""
    request_id = line.request.id
    if isinstance(result, Error):
        status = result.code.http_status
        body: dict[str, Any] = {
            "error": {
                "message": result.message,
                "type": "server_error",
                "param": None,
                "code": result.code.value,
            }
        }
    elif endpoint in _NATIVE:
        status, body = 200, msgspec.to_builtins(result)  # what the native endpoint answers
    else:
        status, body = 200, _body(endpoint, request_id, result)
    return LineResult(
        ok=status == 200,
        record={
            "id": f"batch_req_{request_id}",
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        },
    )


def _body(endpoint: str, request_id: str, result: Completion | EmbedResponse) -> dict[str, Any]:
    if isinstance(result, EmbedResponse):
        tokens = result.usage.prompt_tokens
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(result.embeddings)
            ],
            "model": result.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    chat = endpoint == "/v1/chat/completions"
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": [choice],
        "usage": msgspec.to_builtins(result.usage),
    }
