"""Expiry as OpenAI defines it: a batch whose completion window ends first is `expired`, its
finished lines in the output file and the rest as `batch_expired` in the error file; files go at
their `expires_at` (`expires_after` on upload, `output_expires_after` for a batch's output)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import openai
import pytest
from nats.js.errors import ObjectNotFoundError

from contracts.batches import Batch, FileObject
from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime.batch_store import BatchStore
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_batches import chat_line, until

LINES = 20
HOUR = 3600


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[BatchStore]:
    nc = await nats.connect(settings.nats_url)  # the operator: the tests' own connection
    try:
        yield await BatchStore.open(nc.jetstream(), settings)
    finally:
        await nc.close()


async def test_a_batch_past_its_window_expires_with_its_unfinished_lines(
    settings: Settings, fake_ollama: FakeOllama, store: BatchStore
) -> None:
    fast = msgspec.structs.replace(settings, ack_wait_s=2.0, batch_concurrency=2)
    fake_ollama.config.token_interval = 0.05
    data = ("\n".join(json.dumps(chat_line(i)) for i in range(LINES)) + "\n").encode()
    async with Edge(fast) as edge:
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        generator, batcher = Generator(fast), BatcherService(fast)
        await generator.start()
        await batcher.start()
        try:
            uploaded = await sdk.files.create(file=("in.jsonl", data), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                output_expires_after={"anchor": "created_at", "seconds": 2 * HOUR},
            )

            async def some_done() -> bool:
                counts = (await sdk.batches.retrieve(batch.id)).request_counts
                return counts is not None and counts.completed >= 2

            await until(some_done)
            now = int(time.time())

            def window_ends(b: Batch) -> Batch:  # as if 24 hours had passed
                return msgspec.structs.replace(b, expires_at=now)

            await store.update_batch(batch.id, window_ends)

            async def expired() -> bool:
                return (await sdk.batches.retrieve(batch.id)).status == "expired"

            await until(expired)
            done = await sdk.batches.retrieve(batch.id)
            assert done.expired_at is not None and done.request_counts is not None
            counts = done.request_counts
            assert counts.total == LINES and counts.completed + counts.failed == LINES
            assert 2 <= counts.completed < LINES
            assert done.output_file_id and done.error_file_id
            output = (await sdk.files.content(done.output_file_id)).text.splitlines()
            assert len(output) == counts.completed
            errors = [
                json.loads(line) for line in (await sdk.files.content(done.error_file_id)).text.splitlines()
            ]
            assert len(errors) == counts.failed
            assert {record["error"]["code"] for record in errors} == {"batch_expired"}
            answered = {json.loads(line)["custom_id"] for line in output}
            assert answered.isdisjoint(record["custom_id"] for record in errors)
            out_file = await sdk.files.retrieve(done.output_file_id)
            assert out_file.expires_at == out_file.created_at + 2 * HOUR
        finally:
            await batcher.stop()
            await generator.stop(grace=0)
            await sdk.close()


async def test_a_file_goes_at_its_expires_at(settings: Settings, store: BatchStore) -> None:
    line = (json.dumps(chat_line(0)) + "\n").encode()
    async with Edge(settings) as edge:
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        async with sdk:
            kept = await sdk.files.create(
                file=("a.jsonl", line),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": HOUR},
            )
            assert kept.expires_at == kept.created_at + HOUR
            default = await sdk.files.create(file=("b.jsonl", line), purpose="batch")
            assert default.expires_at == default.created_at + 30 * 24 * HOUR
            with pytest.raises(openai.BadRequestError):
                await sdk.files.create(
                    file=("c.jsonl", line),
                    purpose="batch",
                    expires_after={"anchor": "created_at", "seconds": 5},
                )

            async def age(file_id: str) -> None:  # as if its hour had passed
                entry = await store.records.get(f"file.{file_id}")
                record = msgspec.json.decode(entry.value or b"", type=FileObject)
                aged = msgspec.structs.replace(record, expires_at=int(time.time()) - 1)
                await store.records.put(f"file.{file_id}", msgspec.json.encode(aged))

            await age(kept.id)
            with pytest.raises(openai.NotFoundError):
                await sdk.files.retrieve(kept.id)
            with pytest.raises(ObjectNotFoundError):
                await store.files.get(kept.id)  # its bytes went with it

            await age(default.id)
            assert await store.sweep_files() == 1  # the batcher's periodic sweep, unasked
            with pytest.raises(ObjectNotFoundError):
                await store.files.get(default.id)
            with pytest.raises(openai.NotFoundError):
                await sdk.files.content(default.id)
