"""The client side of the ledger's read API (`llm.ledger.<verb>`), shared by the edge and the CLI."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.micro.request import ERROR_HEADER

from contracts import ErrorBody, ErrorCode, LlmbusError, subjects

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode_error = msgspec.json.Decoder(ErrorBody).decode
TIMEOUT_S = 15.0


async def call(nc: Client, verb: str, query: msgspec.Struct, reply: type[T]) -> T:
    try:
        msg = await nc.request(subjects.LEDGER_PREFIX + verb, _encode(query), timeout=TIMEOUT_S)
    except NoRespondersError:
        raise LlmbusError(
            ErrorCode.LEDGER_UNAVAILABLE, "no ledger is running (start one: `llmbus ledger`)", retry_after=5
        ) from None
    except (NatsTimeoutError, TimeoutError):
        raise LlmbusError(
            ErrorCode.LEDGER_UNAVAILABLE, f"the ledger did not answer {verb} in time", retry_after=5
        ) from None
    if msg.headers and ERROR_HEADER in msg.headers:
        try:
            detail = _decode_error(msg.data).error
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise LlmbusError(ErrorCode.INTERNAL, msg.headers[ERROR_HEADER]) from None
        raise LlmbusError(detail.code, detail.message, retry_after=detail.retry_after)
    return msgspec.json.decode(msg.data, type=reply)
