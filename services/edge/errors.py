"""Every failure at the edge becomes `{"error": {"code", "message", "request_id"}}` with a stable code."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from contracts import ErrorBody, ErrorCode, ErrorDetail, LlmbusError

log = logging.getLogger("llmbus.edge")

# The code of a failure known only by its HTTP status (one Litestar raised, a client that left).
_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.BAD_REQUEST,
    413: ErrorCode.REQUEST_TOO_LARGE,
    415: ErrorCode.BAD_REQUEST,
    429: ErrorCode.RATE_LIMITED,
    499: ErrorCode.CANCELLED,
    503: ErrorCode.BACKEND_UNAVAILABLE,
    504: ErrorCode.DEADLINE_EXCEEDED,
}


def code_for_status(status: int) -> ErrorCode:
    return _STATUS_CODES.get(status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.BAD_REQUEST)


def code_of(exc: Exception) -> ErrorCode:
    """The stable code any exception becomes (what `describe` answers, without the message)."""
    if isinstance(exc, LlmbusError):
        return exc.code
    if isinstance(exc, ValidationException):
        return ErrorCode.BAD_REQUEST
    if isinstance(exc, HTTPException):
        return code_for_status(exc.status_code)
    return ErrorCode.INTERNAL


def request_id_of(request: Request[Any, Any, Any]) -> str:
    """The request's id: the one the handler set (`set_request_id`), else a new one from now on."""
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid is not None else set_request_id(request)


def set_request_id(request: Request[Any, Any, Any], rid: str | None = None) -> str:
    """Names the request (a new id by default): its answer, errors, logs and span carry the id."""
    rid = rid or uuid.uuid4().hex
    request.scope.setdefault("state", {})["request_id"] = rid
    return rid


def error_response(
    code: ErrorCode,
    message: str,
    request_id: str,
    retry_after: float | None = None,
    status: int | None = None,
) -> Response[bytes]:
    body = ErrorBody(ErrorDetail(code=code, message=message, request_id=request_id, retry_after=retry_after))
    hdrs = {"X-Request-Id": request_id}
    if retry_after is not None:
        hdrs["Retry-After"] = str(max(1, round(retry_after)))
    return Response(
        msgspec.json.encode(body),
        status_code=status or code.http_status,
        media_type="application/json",
        headers=hdrs,
    )


class Failure(msgspec.Struct):
    """Any exception, reduced to what every error shape (native, OpenAI, Ollama) needs."""

    code: ErrorCode
    message: str
    status: int
    retry_after: float | None = None
    param: str | None = None  # the request field at fault, when known (OpenAI's `param`)


# An `unsupported` message starts with the field it refuses (services/edge/compat/fields.py and the
# backends' `unsupported`): "`tools` is not supported ...".
_FIELD_FIRST = re.compile(r"^`([^`]+)`")
# Litestar names the whole body after the handler's parameter (`data`): not a field of the API.
_WHOLE_BODY = frozenset({"data", ""})


def describe(request: Request[Any, Any, Any], exc: Exception) -> Failure:
    if isinstance(exc, LlmbusError):
        field = _FIELD_FIRST.match(exc.message) if exc.code is ErrorCode.UNSUPPORTED else None
        param = field.group(1) if field else None
        return Failure(exc.code, exc.message, exc.code.http_status, exc.retry_after, param)
    if isinstance(exc, ValidationException):
        return _invalid_body(exc)
    if isinstance(exc, HTTPException):
        return Failure(code_of(exc), str(exc.detail), exc.status_code)
    rid = request_id_of(request)
    log.error("unhandled error in request %s", rid, exc_info=exc)
    return Failure(ErrorCode.INTERNAL, f"internal error; see the edge log for request {rid}", 500)


def _invalid_body(exc: ValidationException) -> Failure:
    """A body that does not decode: the fields at fault by their names in the API, never by the
    handler's parameter name."""
    detail = exc.extra if exc.extra else exc.detail
    param = None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        parts = []
        for item in detail:
            key = str(item.get("key") or "")
            message = str(item.get("message", item))
            if key in _WHOLE_BODY:
                parts.append(message)
            else:
                param = param or key
                parts.append(f"`{key}`: {message}")
        detail = "; ".join(parts)
    return Failure(ErrorCode.BAD_REQUEST, f"invalid request body: {detail}", 400, param=param)


Render = Callable[[Failure, str], Response[bytes]]


def handlers(
    render: Render,
) -> dict[type[Exception], Callable[[Request[Any, Any, Any], Exception], Response[bytes]]]:
    """Litestar exception handlers that describe any failure, then `render` it in one API's shape."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        failure = describe(request, exc)
        response = render(failure, request_id_of(request))
        # Every API's shape carries Retry-After (429, 503), whether or not its renderer sets it.
        if failure.retry_after is not None and not _has_retry_after(response):
            response.headers["Retry-After"] = str(max(1, round(failure.retry_after)))
        return with_retry_after(response)  # after-request hooks do not see an exception's response

    return {Exception: handle}


def _has_retry_after(response: Response[Any]) -> bool:
    return any(name.lower() == "retry-after" for name in response.headers)  # a plain dict: any case


# What a 429 or 503 that carries no hint of its own tells the client to wait, in seconds.
DEFAULT_RETRY_AFTER = "1"


def with_retry_after(response: Response[Any]) -> Response[Any]:
    """Litestar's after-request hook: every 429 and 503, of every API and whatever produced it
    (a worker's terminal event, a refusal at the edge), says when to retry."""
    if response.status_code in (429, 503) and not _has_retry_after(response):
        response.headers["Retry-After"] = DEFAULT_RETRY_AFTER
    return response


async def retry_after_hook(response: Response[Any]) -> Response[Any]:
    """`with_retry_after` as Litestar's after-request hook: a coroutine, because Litestar runs a
    plain function hook in a worker thread, a thread hop on every request (docs/benchmarks.md)."""
    return with_retry_after(response)


def native_error(failure: Failure, request_id: str) -> Response[bytes]:
    return error_response(failure.code, failure.message, request_id, failure.retry_after, failure.status)


exception_handlers = handlers(native_error)


def by_path(
    renders: dict[str, Render], default: Render
) -> dict[type[Exception], Callable[[Request[Any, Any, Any], Exception], Response[bytes]]]:
    """The application's handlers: a failure no router caught (a 404 for an unknown path, a 405)
    is rendered in the shape of the API whose path prefix it is under."""
    by_prefix = {prefix: handlers(render)[Exception] for prefix, render in renders.items()}
    fallback = handlers(default)[Exception]

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        path = request.url.path
        for prefix, handler in by_prefix.items():
            if path == prefix.rstrip("/") or path.startswith(prefix):
                return handler(request, exc)
        return fallback(request, exc)

    return {Exception: handle}
