"""The worker's first stage: decode and validate a delivery, or reject it.

A message that does not decode or validate would fail the same way on every delivery: it is
terminated (never redelivered) and copied to `LLM_DLQ`, and its sender, when it can be told where
it listens, gets an `error` event `bad_request`.
"""

from __future__ import annotations

import logging
from typing import Generic

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts import Error, ErrorCode, LlmbusError, headers, subjects
from services.runtime import dlq, metrics
from services.runtime.worker_job import R

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
# What a malformed message raises while it is decoded and validated (a deep nesting: RecursionError).
REJECTED = (msgspec.DecodeError, msgspec.ValidationError, LlmbusError, RecursionError)


class Intake(Generic[R]):
    def __init__(self, nc: Client, service: str, request_type: type[R]) -> None:
        self.nc = nc
        self.service = service
        self._decode = msgspec.json.Decoder(request_type).decode

    def decode(self, data: bytes, hdrs: dict[str, str]) -> tuple[R, str]:
        """The request and where its events go; raises one of `REJECTED`."""
        request = self._decode(data)
        request.validate()
        reply = hdrs.get(headers.REPLY) or subjects.event_subject(request.id)
        if not subjects.valid_reply(reply, request.id):
            raise LlmbusError(
                ErrorCode.BAD_REQUEST,
                f"{headers.REPLY} must be the request's own llm.out.<id> or an inbox under "
                f"{subjects.PUBLISHER_INBOX} (got {reply[:80]!r})",
            )
        return request, reply

    async def admit(self, msg: Msg, hdrs: dict[str, str], attempt: int) -> tuple[R, str] | None:
        """`decode`, or None once a malformed message has been rejected."""
        try:
            return self.decode(msg.data, hdrs)
        except REJECTED as exc:
            await self.reject(msg, hdrs, attempt, exc)
            return None

    async def reject(self, msg: Msg, hdrs: dict[str, str], attempt: int, exc: Exception) -> None:
        """Poison: tell the sender where it listens, dead-letter it, terminate it (no redelivery)."""
        message = exc.message if isinstance(exc, LlmbusError) else f"malformed request: {exc}"
        reply = sender_subject(msg.data, hdrs)
        if reply:
            error = Error(seq=0, attempt=attempt, code=ErrorCode.BAD_REQUEST, message=message)
            await self.nc.publish(reply, _encode(error))
        await dlq.dead_letter(
            self.nc,
            service=self.service,
            subject=msg.subject,
            data=msg.data,
            original_headers=hdrs,
            reason=f"rejected: {message}",
            deliveries=attempt,
        )
        log.warning("dead-lettered malformed message on %s: %s", msg.subject, message)
        metrics.worker_request_rejected(msg.subject)
        await msg.term()


def sender_subject(data: bytes, hdrs: dict[str, str]) -> str | None:
    """Where the sender of a malformed request listens, if a worker may publish there."""
    reply = hdrs.get(headers.REPLY)
    # The body's id, or the `Nats-Msg-Id` it was published under when the body cannot be read
    # (the contract makes them the same): the sender listens on that request's subject.
    request_id = dlq.request_id_of(data) or hdrs.get(headers.MSG_ID)
    if reply and subjects.valid_reply(reply, request_id):
        return reply
    # The sender listens on its request's default subject (or named one nobody could hear).
    default = subjects.event_subject(request_id) if request_id is not None else ""
    return default if subjects.valid_reply(default, request_id) else None
