"""The request/reply shape of llmbus's NATS micro services (the janitor's admin API, the ledger's
queries): a reply is the answer's JSON, or an `ErrorBody` with the `Nats-Service-Error-Code`
header set to the HTTP status. One place answers with an error and one place reads a reply."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.micro.request import ERROR_HEADER, Request

from contracts import ErrorBody, ErrorCode, ErrorDetail, LlmbusError

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode_error = msgspec.json.Decoder(ErrorBody).decode


async def respond_error(request: Request, code: ErrorCode, message: str) -> None:
    body = ErrorBody(ErrorDetail(code=code, message=message))
    await request.respond_error(str(code.http_status), message, data=_encode(body))


def read_reply(msg: Msg, reply: type[T]) -> T:
    """The reply decoded as `reply`, or its error raised as the `LlmbusError` it was."""
    if msg.headers and ERROR_HEADER in msg.headers:
        try:
            detail = _decode_error(msg.data).error
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise LlmbusError(ErrorCode.INTERNAL, msg.headers[ERROR_HEADER]) from None
        raise LlmbusError(detail.code, detail.message, retry_after=detail.retry_after)
    return msgspec.json.decode(msg.data, type=reply)
