"""What the shared dialect's routes (seed 003) share: the seed's error body and request id header,
its `X-Project-Name`, and the route decorators that attach them."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import ValidationException

from contracts import ErrorCode, LlmbusError
from contracts.usage import Origin
from services.edge.auth import origin_of
from services.edge.errors import Failure, describe, request_id_of, with_retry_after
from services.edge.tenants import TENANT_NAME

_encode = msgspec.json.Encoder().encode

REQUEST_ID_HEADER = "X-Shared-Ollama-Request-Id"  # the seed's; llmbus's X-Request-Id is there too
RETRY_AFTER_S = 2.0  # the seed's QUEUE_RETRY_AFTER_SECONDS, for a 429/503 that carries no hint
_ERROR_TYPES = {422: "ValidationError", 429: "RateLimitExceeded", 500: "InternalServerError"}


# -- errors and headers


def seed_code(code: ErrorCode) -> str:
    """The seed's name for a code: a request that ran out of time is its `request_timeout`."""
    return "request_timeout" if code is ErrorCode.DEADLINE_EXCEEDED else code.value


def shared_error(failure: Failure, request_id: str) -> Response[bytes]:
    code, status, retry = seed_code(failure.code), failure.status, failure.retry_after
    if failure.code is ErrorCode.DEADLINE_EXCEEDED:  # the seed: a timeout is 503 `request_timeout`
        status = 503
    if status in (429, 503) and retry is None:
        retry = RETRY_AFTER_S
    body = {
        "error": failure.message,
        "error_type": _ERROR_TYPES.get(status, "HTTPException"),
        "code": code,
        "retry_after": retry,
        "request_id": request_id,
    }
    headers = {"X-Request-Id": request_id, REQUEST_ID_HEADER: request_id}
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry)))
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    failure = describe(request, exc)
    if isinstance(exc, ValidationException):
        failure.status = 422  # FastAPI's status for a body that does not validate, as the seed answered
    return with_retry_after(shared_error(failure, request_id_of(request)))


def tag(response: Response[Any]) -> Response[Any]:
    """After every answer of the dialect: the seed's request id header next to llmbus's."""
    rid = response.headers.get("X-Request-Id")
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
    return response


HOOKS: dict[str, Any] = {
    "exception_handlers": {Exception: handle_error},
    "after_request": tag,
    "tags": ["shared (seed 003)"],
}


def shared_post(path: str, summary: str, **more: Any) -> post:
    return post(path, summary=f"Seed 003: {summary}", status_code=200, **HOOKS, **more)


def shared_get(path: str, summary: str, **more: Any) -> get:
    return get(path, summary=f"Seed 003: {summary}", **HOOKS, **more)


def json_answer(body: Any, request_id: str, status: int = 200) -> Response[bytes]:
    headers = {"X-Request-Id": request_id, REQUEST_ID_HEADER: request_id}
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


def origin(request: Request[Any, Any, Any]) -> Origin:
    """The ledger's note of who asked; with auth off, the seed's `X-Project-Name` is the tenant
    (the seed's per-project analytics). With auth on, the API key's tenant stands."""
    found = origin_of(request)
    project = request.headers.get("x-project-name")
    if project is None or found.key_id:
        return msgspec.structs.replace(found, api="shared")
    if not TENANT_NAME.match(project):  # it becomes the ledger's tenant
        raise LlmbusError(ErrorCode.BAD_REQUEST, "X-Project-Name: 1 to 64 letters, digits, `_` or `-`")
    return msgspec.structs.replace(found, api="shared", tenant=project)
