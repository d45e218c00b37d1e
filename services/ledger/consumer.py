"""The ledger's consumer: usage events from `LLM_USAGE`, written to the database in batches.

A durable pull consumer, acked only after the batch's transaction committed: a ledger that crashed
(or was stopped, or lost its database) leaves the rest unacked, and it, or another replica,
receives them again; the store ignores request ids it already has. While the database is down the
batch is retried with backoff, its messages kept in progress, and JetStream keeps everything newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.ledger import Spend
from contracts.models import UsageEvent
from services.ledger.costs import Costs
from services.ledger.store import Store, content_row, row
from services.runtime.retry import Backoff
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.ledger")

DURABLE = "ledger"
RETRY = Backoff(base_s=0.25, max_s=5.0)  # retried without limit: the database may be down for long
LAG_SAMPLES = 100_000  # the newest rows' lags kept for `lag_stats` (`$SRV.STATS.llmbus-ledger`)

_decode = msgspec.json.Decoder(UsageEvent).decode


def stream_config(settings: Settings) -> StreamConfig:
    """Usage events, kept `usage_max_age_s` whether or not the ledger read them (limits retention:
    a second reader, e.g. billing export, may have its own consumer). With content on, no longer
    than its retention: the events carry the prompts and answers too."""
    max_age = settings.usage_max_age_s
    if settings.ledger_content == "on":
        max_age = min(max_age, settings.ledger_content_retention_s)
    return StreamConfig(
        name=subjects.USAGE_STREAM,
        subjects=[subjects.USAGE_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age,
        duplicate_window=min(settings.dedupe_window_s, max_age),
        discard=DiscardPolicy.OLD,
        num_replicas=settings.stream_replicas,
    )


async def provision(js: JetStreamContext, settings: Settings) -> None:
    config = stream_config(settings)
    try:
        await js.stream_info(subjects.USAGE_STREAM)
        await js.update_stream(config)
    except Exception:  # NotFoundError; anything else resurfaces in add_stream
        await js.add_stream(config)
    await js.add_consumer(
        subjects.USAGE_STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait_s,
            max_deliver=-1,  # a usage event is never given up on
            max_ack_pending=settings.ledger_batch * 4,
        ),
    )


class Consumer:
    def __init__(
        self,
        js: JetStreamContext,
        store: Store,
        costs: Costs,
        batch: int,
        on_spend: Callable[[list[Spend]], Awaitable[None]],
        *,
        keep_content: bool = False,
    ) -> None:
        self.js = js
        self.store = store
        self.costs = costs
        self.batch = batch
        self.on_spend = on_spend
        self.keep_content = keep_content  # LLMBUS_LEDGER_CONTENT=on: store prompts and answers
        self.recorded = 0  # new rows written by this process
        self.lag_s = 0.0  # the last batch's newest event: its end to its commit
        self.lags: deque[float] = deque(maxlen=LAG_SAMPLES)  # each row: its request's end to its commit

    async def run(self) -> None:
        psub = await self.js.pull_subscribe_bind(DURABLE, subjects.USAGE_STREAM)
        while True:
            try:
                msgs = await psub.fetch(self.batch, timeout=5)
            except (NatsTimeoutError, TimeoutError):
                continue
            except Exception as exc:  # NATS reconnecting: the client recovers on its own
                log.warning("fetching usage events failed: %s", exc)
                await asyncio.sleep(1)
                continue
            await self.write(msgs)

    async def write(self, msgs: list[Msg]) -> None:
        self.costs.refresh()
        rows, contents, now = [], [], time.time()
        for msg in msgs:
            try:
                event = _decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("dropping a malformed usage event on %s: %s", msg.subject, exc)
                with contextlib.suppress(Exception):
                    await msg.term()
                continue
            cost = self.costs.of(event.model, event.prompt_tokens, event.completion_tokens)
            rows.append(row(event, cost, now))
            if self.keep_content and (said := content_row(event, _stream_seq(msg))) is not None:
                contents.append(said)
        if rows:
            new, spent = await self._commit(rows, contents, msgs)
            committed = time.time()
            self.recorded += new
            self.lags.extend(committed - r["ended_at"] for r in rows)
            self.lag_s = committed - max(r["ended_at"] for r in rows)
            if spent:
                await self.on_spend(spent)
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _commit(
        self, rows: list[dict[str, Any]], contents: list[dict[str, Any]], msgs: list[Msg]
    ) -> tuple[int, list[Spend]]:
        attempt = 0
        while True:
            try:
                return await self.store.record(rows, contents)
            except Exception as exc:
                delay = RETRY.delay(min(attempt, 8))
                attempt += 1
                log.warning(
                    "could not write %d usage rows (%s); retrying in %.1f s", len(rows), _brief(exc), delay
                )
                for msg in msgs:  # still ours: no redelivery to another replica meanwhile
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await asyncio.sleep(delay)


def lag_stats(consumer: Consumer) -> dict[str, Any]:
    """Rows written and the lag from a request's end to its row's commit (ms) over the newest
    rows: what the benchmark reports (`python -m scripts.bench --ledger`)."""
    lags = sorted(consumer.lags)

    def at(q: float) -> float | None:
        return round(lags[min(len(lags) - 1, int(q * len(lags)))] * 1000, 2) if lags else None

    return {
        "recorded": consumer.recorded,
        "lag_samples": len(lags),
        "lag_p50_ms": at(0.50),
        "lag_p99_ms": at(0.99),
        "lag_max_ms": at(1.0),
    }


def _stream_seq(msg: Msg) -> int | None:
    with contextlib.suppress(Exception):
        return int(msg.metadata.sequence.stream)
    return None


async def forget_events(js: JetStreamContext, seqs: list[int]) -> None:
    """Deletes erased requests' usage events from LLM_USAGE: they carry the prompt and answer too.
    Best effort: an event already gone (aged out) is fine; one that could not be deleted is logged
    and still goes with the stream's max age (at most the retention)."""
    failed = 0
    for seq in seqs:
        try:
            await js.delete_msg(subjects.USAGE_STREAM, seq)
        except NotFoundError:
            pass
        except Exception:
            failed += 1
    if failed:
        log.warning("could not delete %d erased usage events from %s", failed, subjects.USAGE_STREAM)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
