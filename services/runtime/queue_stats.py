"""The generation queue as JetStream holds it: `GET /v1/queue`, `llmbus queue` and `queued` events.

Everything is read from JetStream, so every edge (and the CLI) sees the same numbers:

* `LLM_REQ` is a work queue: a request stays in it until a worker acks its end, so the stream's
  message count per subject `llm.req.generate.<model>` is that model's waiting + running.
* A consumer (`generator`, `generator-<models>`) delivers in stream order: `delivered.stream_seq`
  (D) is the newest request it handed out; `num_pending` what it has not, `num_ack_pending` what
  runs. A model's running requests are its messages at or before D: found by stepping through them
  (`next_by_subj`, at most the consumer's running + 1 gets), and the first after D is the oldest
  waiting one, whose stream time gives its age.
* A request's position (the edge knows its stream sequence S from the publish acknowledgement):
  the consumer's undelivered messages at or before S. JetStream counts no range, so it is bounded:
  at most `min(num_pending, S - D)` (every message between D and S, whatever its subject), at
  least `num_pending - (last_seq - S)` (all newer messages counted as this consumer's). When the
  two meet the position is exact (a queue of one consumer's requests only); otherwise (other
  subjects' requests in between) the consumer's messages after D are stepped through
  (`next_by_subj`, once per look for all who ask, at most `WALK_LIMIT`) and counted; past that
  limit the upper bound is reported with `exact: false` (docs/contract.md).
* Generators and their concurrency: each worker's NATS micro service INFO (metadata).
* Accepted per minute: the edges' `accepted` records in `LLM_OUT` of the last 60 s (one batched
  direct get); completed per minute: the ledger's stats of the last 60 s, when a ledger answers.

`QueueStats(nc)` shares one look (`snapshot`) between the requests that ask within `FRESH_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from contracts import Accepted, LlmbusError, subjects
from contracts.ledger import StatsQuery, StatsReport
from contracts.queue import ConsumerQueue, GeneratorInfo, ModelQueue, Queued, QueueReport
from contracts.route import is_routed
from services.runtime import ledger_client

log = logging.getLogger(__name__)

FRESH_S = 0.25  # a look younger than this is shared
WALK_LIMIT = 256  # messages stepped through to make a bounded position exact
LOOK_TIMEOUT_S = 2.0
GATHER_S = 0.3  # how long micro service INFO answers are collected
WINDOW_S = 60.0
REQUESTS = subjects.REQUEST_STREAM
_DIRECT_GET_OUT = "$JS.API.DIRECT.GET." + subjects.EVENT_STREAM
_ACCEPTED = subjects.EVENT_PREFIX + "*.accepted"
_decode_accepted = msgspec.json.Decoder(Accepted).decode


def matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def _generates(pattern: str) -> bool:
    return pattern.startswith(subjects.GENERATE_PREFIX) or pattern in ("llm.req.>", ">")


def _delivered(info: ConsumerInfo) -> int:
    """The stream sequence of the newest request the consumer handed out (0: none yet)."""
    return (info.delivered.stream_seq or 0) if info.delivered is not None else 0


def consumer_filters(info: ConsumerInfo) -> list[str]:
    config = info.config
    return list(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


@dataclass(frozen=True)
class Snapshot:
    """One look at `LLM_REQ`: per-subject counts of generate requests, its last sequence, consumers."""

    counts: dict[str, int]
    first_seq: int
    last_seq: int
    consumers: list[ConsumerInfo]
    taken: float  # monotonic
    # filter -> (sequences of its messages found after the consumer's delivered one, next to ask)
    walks: dict[str, tuple[list[int], int]] = field(default_factory=dict)

    def consumer_for(self, subject: str) -> ConsumerInfo | None:
        for info in self.consumers:
            if any(matches(subject, f) for f in consumer_filters(info)):
                return info
        return None

    def position(self, subject: str, seq: int) -> Queued | None:
        """The request stored at `seq` on `subject`, if it still waits; None once delivered."""
        model = subjects.model_from_subject(subject)
        info = self.consumer_for(subject)
        if info is None:  # nobody serves it: it waits behind every request of its model
            upper = max(1, min(self.counts.get(subject, 1), seq - self.first_seq + 1))
            lower = max(1, self.counts.get(subject, 1) - (self.last_seq - seq))
            waiting, running = self.counts.get(subject, 0), 0
        else:
            delivered = _delivered(info)
            if delivered >= seq:
                return None
            waiting, running = info.num_pending or 0, info.num_ack_pending or 0
            upper = max(1, min(waiting, seq - delivered))
            lower = max(1, waiting - max(0, self.last_seq - seq))
        return Queued(
            seq=-1,
            attempt=0,
            model=model,
            position=upper,
            ahead=upper - 1,
            waiting=waiting,
            running=running,
            exact=lower >= upper,
        )


class QueueStats:
    """The queue's numbers for one NATS connection (the edge's, or the CLI's)."""

    def __init__(self, nc: Client, *, ledger: bool = True) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.ledger = ledger  # ask the ledger for completed per minute
        self._snapshot: Snapshot | None = None
        self._look: asyncio.Task[Snapshot] | None = None
        self._walking = asyncio.Lock()

    async def snapshot(self, holding: int = 0) -> Snapshot:
        """A look at most `FRESH_S` old (and one that saw the stream's sequence `holding`), shared
        with concurrent callers."""
        for _ in range(2):  # a look in flight may have been sent before `holding` was stored
            cached = self._snapshot
            if (
                cached is not None
                and time.monotonic() - cached.taken < FRESH_S
                and cached.last_seq >= holding
            ):
                return cached
            if self._look is None or self._look.done():
                self._look = asyncio.get_running_loop().create_task(self._take())
            snapshot = await asyncio.shield(self._look)
            if snapshot.last_seq >= holding:
                return snapshot
        return snapshot

    async def _take(self) -> Snapshot:
        taken = time.monotonic()
        async with asyncio.timeout(LOOK_TIMEOUT_S):
            info = await self.js.stream_info(
                subjects.REQUEST_STREAM, subjects_filter=subjects.GENERATE_SUBJECTS
            )
            consumers = await self.js.consumers_info(subjects.REQUEST_STREAM)
        snapshot = Snapshot(
            counts=dict(info.state.subjects or {}),
            first_seq=info.state.first_seq,
            last_seq=info.state.last_seq,
            consumers=[
                c for c in consumers if any(f.startswith("llm.req.generate") for f in consumer_filters(c))
            ],
            taken=taken,
        )
        self._snapshot = snapshot
        return snapshot

    async def position(self, subject: str, seq: int) -> Queued | None:
        """The `queued` event for the request at `seq` on `subject`; None once a generator has it.

        When the bounds do not meet (other subjects' requests in between), the consumer's messages
        before it are stepped through, once per look for every request that asks."""
        snapshot = await self.snapshot(holding=seq)
        status = snapshot.position(subject, seq)
        if status is None or status.exact:
            return status
        with contextlib.suppress(NatsTimeoutError, TimeoutError, LlmbusError):
            counted = await self._count(snapshot, subject, seq)
            if counted is not None:
                return msgspec.structs.replace(status, position=counted, ahead=counted - 1, exact=True)
        return status

    async def _count(self, snapshot: Snapshot, subject: str, seq: int) -> int | None:
        """The undelivered messages of `subject`'s consumer at or before `seq` (None: too many)."""
        info = snapshot.consumer_for(subject)
        filters = consumer_filters(info) if info is not None else [subject]
        start = _delivered(info) + 1 if info is not None else snapshot.first_seq
        total = 0
        async with self._walking:
            for pattern in filters:
                found, ask = snapshot.walks.get(pattern, ([], start))
                while ask <= seq and len(found) < WALK_LIMIT:
                    try:
                        msg = await self.js.get_msg(
                            subjects.REQUEST_STREAM, seq=ask, subject=pattern, next=True
                        )
                    except NotFoundError:  # nothing more on it
                        ask = snapshot.last_seq + 1
                        break
                    found.append(msg.seq or ask)
                    ask = (msg.seq or ask) + 1
                snapshot.walks[pattern] = (found, ask)
                if ask <= seq:
                    return None
                total += sum(1 for s in found if s <= seq)
        return max(1, total)

    async def report(self) -> QueueReport:
        """`GET /v1/queue`: every model with requests in the queue or accepted in the last minute."""
        snapshot = await self.snapshot()
        generators, accepted, completed = await asyncio.gather(
            self.generators(), self.accepted_per_model(), self.completed_per_model()
        )
        by_consumer: dict[str, list[GeneratorInfo]] = {}
        for generator in generators:
            by_consumer.setdefault(generator.consumer, []).append(generator)
        consumers = [
            ConsumerQueue(
                name=info.name,
                filters=consumer_filters(info),
                waiting=info.num_pending or 0,
                running=info.num_ack_pending or 0,
                pulls=info.num_waiting or 0,
                generators=len(by_consumer.get(info.name, [])),
                concurrency=sum(g.concurrency or 0 for g in by_consumer.get(info.name, [])),
            )
            for info in snapshot.consumers
        ]
        rows = {c.name: c for c in consumers}
        named = {subjects.generate_subject(m) for m in accepted if not is_routed(m)}  # not `auto`
        models = set(snapshot.counts) | named
        out = []
        for subject in sorted(models):
            model = subjects.model_from_subject(subject)
            info = snapshot.consumer_for(subject)
            running, oldest = await self._split(snapshot, subject, info)
            row = rows.get(info.name) if info is not None else None
            out.append(
                ModelQueue(
                    model=model,
                    waiting=max(0, snapshot.counts.get(subject, 0) - running),
                    running=running,
                    consumer=info.name if info is not None else None,
                    generators=row.generators if row else 0,
                    concurrency=row.concurrency if row else 0,
                    oldest_waiting_s=oldest,
                    accepted_per_min=accepted.get(model, 0),
                    completed_per_min=None if completed is None else completed.get(model, 0),
                )
            )
        return QueueReport(at_ms=int(time.time() * 1000), models=out, consumers=consumers)

    async def _split(
        self, snapshot: Snapshot, subject: str, info: ConsumerInfo | None
    ) -> tuple[int, float | None]:
        """A model's running requests (its messages at or before the consumer's delivered sequence)
        and the age of its oldest waiting one (the first after it)."""
        if not snapshot.counts.get(subject):
            return 0, None
        delivered = _delivered(info) if info is not None else 0
        bound = (info.num_ack_pending or 0) + 1 if info is not None else 1
        running, seq = 0, max(1, snapshot.first_seq)
        with contextlib.suppress(NotFoundError, NatsTimeoutError, TimeoutError, LlmbusError):
            for _ in range(bound + 1):
                msg = await self.js.get_msg(subjects.REQUEST_STREAM, seq=seq, subject=subject, next=True)
                if (msg.seq or 0) > delivered:
                    age = (datetime.now(UTC) - msg.time).total_seconds() if msg.time else None
                    return running, age
                running += 1
                seq = (msg.seq or seq) + 1
        return running, None

    async def generators(self) -> list[GeneratorInfo]:
        """Every generator process that answers its micro service INFO within `GATHER_S`."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        out: list[GeneratorInfo] = []
        try:
            await self.nc.publish("$SRV.INFO.llmbus-generator", b"", reply=inbox)
            with contextlib.suppress(TimeoutError, NatsTimeoutError):
                async with asyncio.timeout(GATHER_S):
                    while True:
                        msg = await sub.next_msg(GATHER_S)
                        with contextlib.suppress(ValueError, KeyError):
                            info = json.loads(msg.data)
                            meta = info.get("metadata") or {}
                            concurrency = meta.get("concurrency")
                            out.append(
                                GeneratorInfo(
                                    id=str(info["id"]),
                                    concurrency=int(concurrency) if concurrency else None,
                                    consumer=str(meta.get("durable") or "generator"),
                                )
                            )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    async def accepted_per_model(self) -> dict[str, int]:
        """The `accepted` records stored in `LLM_OUT` in the last `WINDOW_S`, per model."""
        counts: dict[str, int] = {}
        since = (datetime.now(UTC) - timedelta(seconds=WINDOW_S)).isoformat().replace("+00:00", "Z")
        query: dict[str, object] = {"start_time": since, "next_by_subj": _ACCEPTED, "batch": 256}
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            with contextlib.suppress(TimeoutError, NatsTimeoutError):
                for _ in range(64):  # at most 16k records a minute are counted
                    await self.nc.publish(_DIRECT_GET_OUT, json.dumps(query).encode(), reply=inbox)
                    while True:
                        msg = await sub.next_msg(LOOK_TIMEOUT_S)
                        hdrs = msg.headers or {}
                        status = hdrs.get("Status")
                        if status == "204":
                            break
                        if status is not None:  # 404: none (more)
                            return counts
                        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                            model = _decode_accepted(msg.data).model
                            counts[model] = counts.get(model, 0) + 1
                    if int(hdrs.get("Nats-Num-Pending", "0") or 0) <= 0:
                        return counts
                    query = {"seq": int(hdrs.get("Nats-Last-Sequence", "0") or 0) + 1}
                    query |= {"next_by_subj": _ACCEPTED, "batch": 256}
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return counts

    async def completed_per_model(self) -> dict[str, int] | None:
        """The ledger's requests of the last `WINDOW_S` per model; None when no ledger answers."""
        if not self.ledger:
            return None
        try:
            async with asyncio.timeout(LOOK_TIMEOUT_S):
                report = await ledger_client.call(
                    self.nc, "stats", StatsQuery(window_s=WINDOW_S), StatsReport
                )
        except (LlmbusError, TimeoutError, NoRespondersError, NatsTimeoutError):
            return None
        return {row.model: row.requests for row in report.models}


_per_connection: weakref.WeakKeyDictionary[Client, QueueStats] = weakref.WeakKeyDictionary()


def of(nc: Client) -> QueueStats:
    """The one `QueueStats` of a connection: its looks are shared by all who ask through it."""
    stats = _per_connection.get(nc)
    if stats is None:
        stats = _per_connection[nc] = QueueStats(nc)
    return stats


@dataclass(frozen=True)
class Waiting:
    """Where one request waits: its subject and stream sequence (the publish acknowledgement's)."""

    stats: QueueStats
    subject: str
    seq: int

    async def look(self) -> Queued | None:
        """Its `queued` event now; None once a generator has it."""
        return await self.stats.position(self.subject, self.seq)
