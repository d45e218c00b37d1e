"""Every failure at the edge becomes `{"error": {"code", "message", "request_id"}}` with a stable code."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from contracts import ErrorBody, ErrorCode, ErrorDetail, LlmbusError

log = logging.getLogger("llmbus.edge")

_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.BAD_REQUEST,
    413: ErrorCode.REQUEST_TOO_LARGE,
    415: ErrorCode.BAD_REQUEST,
    429: ErrorCode.RATE_LIMITED,
}


def request_id_of(request: Request[Any, Any, Any]) -> str:
    rid = request.scope.get("state", {}).get("request_id")
    if rid is None:
        rid = uuid.uuid4().hex
        request.scope.setdefault("state", {})["request_id"] = rid
    return str(rid)


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


def on_llmbus_error(request: Request[Any, Any, Any], exc: LlmbusError) -> Response[bytes]:
    return error_response(exc.code, exc.message, request_id_of(request), exc.retry_after)


def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    detail = exc.extra if exc.extra else exc.detail
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        detail = "; ".join(str(item.get("message", item)) for item in detail)
    return error_response(ErrorCode.BAD_REQUEST, f"invalid request body: {detail}", request_id_of(request))


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    code = _STATUS_CODES.get(exc.status_code)
    if code is None:
        code = ErrorCode.INTERNAL if exc.status_code >= 500 else ErrorCode.BAD_REQUEST
    return error_response(code, str(exc.detail), request_id_of(request), status=exc.status_code)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    rid = request_id_of(request)
    log.error("unhandled error in request %s", rid, exc_info=exc)
    return error_response(ErrorCode.INTERNAL, f"internal error; see the edge log for request {rid}", rid)


exception_handlers = {
    LlmbusError: on_llmbus_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected,
}
