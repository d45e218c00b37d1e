"""The client side of the ledger's read API (`llm.ledger.<verb>`), shared by the edge and the CLI."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import ErrorCode, LlmbusError, subjects
from services.runtime.micro import read_reply

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
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
    return read_reply(msg, reply)
