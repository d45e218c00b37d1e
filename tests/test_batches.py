"""OpenAI's Batch API over JetStream: the official client's files.create -> batches.create ->
batches.retrieve -> files.content round trip, with a generator and the batcher killed mid-batch:
every line answered exactly once, bad lines in the error file, the rest run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import msgspec
import openai
import pytest

from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"
LINES = 24


def chat_line(i: int) -> dict[str, object]:
    return {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {i}"}],
            "temperature": 0,
        },
    }


def input_file(lines: int) -> bytes:
    rows = [json.dumps(chat_line(i)) for i in range(lines)]
    rows.append(json.dumps({**chat_line(999), "url": "/v1/embeddings"}))  # not the batch's endpoint
    rows.append("{not json")
    return ("\n".join(rows) + "\n").encode()


async def expected(fake: FakeOllama, i: int) -> str:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "stream": False}
        return str((await http.post("/api/chat", json=body)).json()["message"]["content"])


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, ack_wait_s=1.0, batch_concurrency=4)


@pytest.fixture
async def sdk(fast: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    async with Edge(fast) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        async with client:
            yield client


async def until(check: object, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # type: ignore[operator]
            await asyncio.sleep(0.1)


async def test_a_batch_survives_a_killed_generator_and_batcher_and_answers_each_line_once(
    fast: Settings, fake_ollama: FakeOllama, sdk: openai.AsyncOpenAI
) -> None:
    fake_ollama.config.token_interval = 0.02  # a line takes a moment: the kill lands mid-batch
    uploaded = await sdk.files.create(file=("in.jsonl", input_file(LINES)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = await sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"k": "v"},
    )
    assert batch.status == "validating"

    generator, batcher = Generator(fast), BatcherService(fast, ack_wait_s=1.0)
    await generator.start()
    await batcher.start()
    try:

        async def some_done() -> bool:
            counts = (await sdk.batches.retrieve(batch.id)).request_counts
            return counts is not None and counts.completed >= 4

        await until(some_done)
        await generator.stop(grace=0)  # mid-answer: its lines are redelivered to the next one
        await batcher.stop()  # mid-batch: the next batcher resumes it from the lines kept in KV
        generator, batcher = Generator(fast), BatcherService(fast, ack_wait_s=1.0)
        await generator.start()
        await batcher.start()

        async def finished() -> bool:
            return (await sdk.batches.retrieve(batch.id)).status == "completed"

        await until(finished, 60)
    finally:
        await batcher.stop()
        await generator.stop(grace=0)

    done = await sdk.batches.retrieve(batch.id)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        LINES + 2,
        LINES,
        2,
    )
    assert done.metadata == {"k": "v"}
    assert done.output_file_id and done.error_file_id
    output = [json.loads(line) for line in (await sdk.files.content(done.output_file_id)).text.splitlines()]
    assert sorted(record["custom_id"] for record in output) == sorted(
        f"q{i}" for i in range(LINES)
    )  # once each
    for record in output:
        assert record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion"
        i = int(record["custom_id"][1:])
        assert body["choices"][0]["message"]["content"] == await expected(fake_ollama, i)
    errors = [json.loads(line) for line in (await sdk.files.content(done.error_file_id)).text.splitlines()]
    assert [record["custom_id"] for record in errors] == ["q999", None]
    assert all(record["error"]["code"] == "invalid_request" for record in errors)

    listed = await sdk.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    files = [f.id async for f in sdk.files.list(purpose="batch_output")]
    assert sorted(files) == sorted([done.output_file_id, done.error_file_id])
    assert [f.id async for f in sdk.files.list(purpose="batch")] == [uploaded.id]


async def test_files_and_batches_refuse_what_they_cannot_take(
    fast: Settings, sdk: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError):
        await sdk.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        await sdk.files.create(file=("in.jsonl", b"\n\n"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve("a.b*c")  # not a key NATS accepts: not found, not a 500
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    uploaded = await sdk.files.create(file=("in.jsonl", input_file(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")  # type: ignore[arg-type]
    assert (await sdk.files.retrieve(uploaded.id)).filename == "in.jsonl"
    deleted = await sdk.files.delete(uploaded.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        await sdk.files.content(uploaded.id)


async def test_a_cancelled_batch_ends_cancelled_with_the_lines_it_finished(
    fast: Settings, fake_ollama: FakeOllama, sdk: openai.AsyncOpenAI
) -> None:
    fake_ollama.config.token_interval = 0.05
    uploaded = await sdk.files.create(file=("in.jsonl", input_file(40)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    generator, batcher = Generator(fast), BatcherService(fast, ack_wait_s=1.0)
    await generator.start()
    await batcher.start()
    try:

        async def some_done() -> bool:
            counts = (await sdk.batches.retrieve(batch.id)).request_counts
            return counts is not None and counts.completed >= 2

        await until(some_done)
        assert (await sdk.batches.cancel(batch.id)).status == "cancelling"

        async def cancelled() -> bool:
            return (await sdk.batches.retrieve(batch.id)).status == "cancelled"

        await until(cancelled)
    finally:
        await batcher.stop()
        await generator.stop(grace=0)
    done = await sdk.batches.retrieve(batch.id)
    assert done.request_counts is not None and 2 <= done.request_counts.completed < 40
    assert done.output_file_id
    output = (await sdk.files.content(done.output_file_id)).text.splitlines()
    assert len(output) == done.request_counts.completed
