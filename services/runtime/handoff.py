"""Handing a routed request on to a generator: what the classifier and the edge's fallback share.

Routing a request means, in this order: take ownership (`Claims.take`), publish `start` and
`routed` on the request's event subject (seq 0 and 1), then republish the request to
`llm.req.generate.<model>` with `Llmbus-Seq: 2`, so the generator continues the numbering and the
client sees one stream. The claim makes "a slow classifier and the edge's fallback both route it"
impossible: whoever creates the claim key first routes the request, the other drops it.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from contracts import GenerateRequest, headers, subjects
from contracts.batches import BATCH_API
from contracts.route import CLAIMS_BUCKET
from services.runtime import bus, tracing, usage

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode


class Claims:
    """Atomic "first one wins" per request id, in a KV bucket whose keys expire after `ttl_s`."""

    def __init__(self, js: JetStreamContext, ttl_s: float) -> None:
        self.js = js
        self.ttl_s = ttl_s
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._open()
        return self._kv

    async def _open(self) -> KeyValue:
        config = KeyValueConfig(bucket=CLAIMS_BUCKET, ttl=self.ttl_s, history=1, storage=StorageType.MEMORY)
        return await bus.key_value(self.js, config)

    async def reopen(self) -> None:
        """After a reconnect: re-creates the bucket (in memory, a restarted NATS lost it) if in use."""
        if self._kv is not None:
            await self._open()

    async def take(self, request_id: str, owner: str) -> bool:
        """True when `owner` now holds the request (or already did: a redelivery of its own claim)."""
        kv = await self._bucket()
        try:
            await kv.create(request_id, owner.encode())
            return True
        except KeyWrongLastSequenceError:
            entry = await kv.get(request_id)
            return entry.value == owner.encode()


async def republish(
    js: JetStreamContext,
    request: GenerateRequest,
    *,
    reply: str,
    seq: int,
    deadline_ms: str | None,
    origin: str | None = None,
    route: str = "",
) -> None:
    """Publishes `request` (its model already chosen) to the generators, continuing at `seq`.

    `origin` is the routed request's `Llmbus-Origin`, passed on with the `route` it took.
    """
    asked = usage.origin({headers.ORIGIN: origin}) if origin is not None else None
    subject = subjects.generate_subject(request.model)
    if asked is not None and asked.api == BATCH_API:  # a batch's line stays on the batch lane
        subject = subjects.batch_lane(subject)
    hdrs = {
        # Not the bare id: JetStream already saw that on `llm.req.route` and would drop this one.
        headers.MSG_ID: f"{request.id}:routed",
        headers.REPLY: reply,
        headers.SEQ: str(seq),
    }
    if deadline_ms is not None:
        hdrs[headers.DEADLINE] = deadline_ms
    if asked is not None:
        hdrs[headers.ORIGIN] = usage.encode_origin(msgspec.structs.replace(asked, route=route))
    with tracing.publish_span(subject, request.id, hdrs):
        await js.publish(subject, _encode(request), headers=hdrs, timeout=5)
