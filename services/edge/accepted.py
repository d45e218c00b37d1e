"""A request's `accepted` record (`contracts.Accepted`, on `llm.out.<id>.accepted` in LLM_OUT).

The edge stores it before the client hears that its request was accepted, so a follow or a cancel
on any edge finds the request at once, and an `Idempotency-Key` reused for another request is
told apart (`fingerprint`). The edge also keeps its own records until their requests' deadlines:
a restarted NATS loses LLM_OUT (a memory stream), and with it the owner's way to follow or cancel,
so after a reconnect they are stored again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict

import msgspec
from nats.aio.client import Client
from nats.js.api import PubAck

from contracts import Accepted, EmbedRequest, ErrorCode, GenerateRequest, LlmbusError, headers, subjects
from services.edge.feed import PUBLISH_BACKOFF, PUBLISH_ERRORS, STORE_ERRORS, TERMINAL_GRACE_S
from services.runtime import events
from services.runtime.retry import with_backoff

log = logging.getLogger("llmbus.edge")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Accepted).decode


def fingerprint(request: GenerateRequest | EmbedRequest) -> str:
    """Identifies a request's content whatever its id: an `Idempotency-Key` reused for another."""
    body = _encode(msgspec.structs.replace(request, id="-"))
    return hashlib.blake2b(body, digest_size=12).hexdigest()


class AcceptedRecords:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # This edge's records until their requests' deadlines (plus the feed's grace), oldest first.
        self._kept: OrderedDict[str, tuple[Accepted, float]] = OrderedDict()

    async def store(self, accepted: Accepted, *, deadline: float) -> None:
        """Stores the record (retried until `deadline`); one that cannot be stored is only logged:
        its request is queued and runs, only following it by id fails."""

        async def publish() -> PubAck:
            hdrs = {headers.MSG_ID: f"{accepted.request_id}.accepted"}
            return await self.js.publish(subject, _encode(accepted), headers=hdrs, timeout=2)

        subject = subjects.accepted_subject(accepted.request_id)
        try:
            await with_backoff(
                publish,
                backoff=PUBLISH_BACKOFF,
                retryable=lambda exc: isinstance(exc, PUBLISH_ERRORS),
                deadline=deadline,
            )
        except PUBLISH_ERRORS as exc:
            log.warning("request %s: could not store its `accepted` record: %r", accepted.request_id, exc)

    def keep(self, accepted: Accepted, deadline: float) -> None:
        """Keeps the record of a request this edge accepted until `deadline` (event-loop time)."""
        now = asyncio.get_running_loop().time()
        while self._kept and next(iter(self._kept.values()))[1] < now:
            self._kept.popitem(last=False)
        self._kept[accepted.request_id] = (accepted, deadline + TERMINAL_GRACE_S)

    async def store_again(self, patience: float) -> None:
        """After a reconnect: stores the kept records of requests still within their deadline."""
        loop = asyncio.get_running_loop()
        live = [(a, d) for a, d in self._kept.values() if d > loop.time()]
        give_up = loop.time() + patience
        await asyncio.gather(*(self.store(a, deadline=min(d, give_up)) for a, d in live))

    async def read(self, request_id: str) -> Accepted | None:
        """The request's record in LLM_OUT; None when there is none (or it does not decode)."""
        try:
            data = await events.last(self.nc, subjects.accepted_subject(request_id))
        except STORE_ERRORS as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the event store is unavailable", retry_after=1
            ) from exc
        if data is None:
            return None
        try:
            return _decode(data)
        except msgspec.DecodeError:
            return None
