"""What the queue looks like: the `queued` event a waiting request streams, and `GET /v1/queue`.

Both are the edge's, read from JetStream (the request stream's per-subject counts and its
consumers' state), never carried on the bus: docs/contract.md says how exact they are.
"""

from __future__ import annotations

import msgspec

from contracts.base import EventBase


class Queued(EventBase, tag="queued"):
    """A streamed request still waits for a generator: sent before `start`, refreshed every ~1.5 s.

    `seq` is -1 (no SSE `id:`): the edge's, not part of the replayable sequence. `position` 1 =
    next; `ahead` = `position - 1`; `waiting` and `running` are the queue it waits in (the
    consumer serving its model: every model that consumer serves). `exact`: the position was
    counted in JetStream's view at the look; false: an upper bound (more than 256 requests of other
    queues sat in between, or the count failed).
    """

    model: str
    position: int
    ahead: int
    waiting: int
    running: int
    exact: bool


class GeneratorInfo(msgspec.Struct, kw_only=True):
    """One generator process (its NATS micro service instance)."""

    id: str
    concurrency: int | None  # None: an older worker that does not say
    consumer: str


class ConsumerQueue(msgspec.Struct, kw_only=True):
    """One durable consumer of the request stream (`generator`, `generator-<models>`, ...)."""

    name: str
    filters: list[str]
    waiting: int  # not delivered yet (JetStream's num_pending)
    running: int  # delivered, not acked yet (num_ack_pending)
    pulls: int  # pull requests waiting on the server: free slots (num_waiting)
    generators: int  # processes behind it (micro service instances)
    concurrency: int  # their slots, summed


class ModelQueue(msgspec.Struct, kw_only=True):
    """One model's requests in `LLM_REQ` (`llm.req.generate.<model>`)."""

    model: str
    waiting: int
    running: int
    consumer: str | None  # the consumer that serves it; None: no generator serves this model
    generators: int
    concurrency: int
    oldest_waiting_s: float | None  # age of the oldest request not delivered yet
    accepted_per_min: int | None  # `accepted` records in LLM_OUT, the last 60 s
    completed_per_min: int | None  # the ledger's rows of the last 60 s (None: no ledger answered)


class QueueReport(msgspec.Struct, kw_only=True):
    """`GET /v1/queue`: every model with a request queued, running or accepted in the last minute."""

    at_ms: int  # Unix epoch milliseconds of the look
    models: list[ModelQueue]
    consumers: list[ConsumerQueue]
