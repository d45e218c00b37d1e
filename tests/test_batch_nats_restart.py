"""A batch across a NATS crash: nats-server SIGKILLed mid-batch and restarted on the same store
directory. The batch's files, records, finished lines and queued lines are file-backed; the edge,
the batcher and the generator reconnect, and every line is answered exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import openai
import pytest

from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_batches import chat_line, expected, until

LINES = 30


@pytest.fixture
async def synced(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A server that syncs every write: what JetStream acknowledged survives a SIGKILL (by default
    it syncs every 2 minutes, and a crash loses the newest acknowledged messages and acks)."""
    config = tmp_path / "sync.conf"
    config.write_text("jetstream { sync_interval: always }\n")
    server = await NatsServer(tmp_path / "synced", config_file=config, auth=True, anonymous="admin").astart()
    yield server
    await server.astop()


async def test_a_batch_survives_a_nats_restart_and_answers_each_line_once(
    settings: Settings, fake_ollama: FakeOllama, synced: NatsServer
) -> None:
    nats_server = synced
    fast = msgspec.structs.replace(
        settings,
        nats_url=synced.url,
        nats_credentials=str(synced.credentials_file),
        ack_wait_s=2.0,
        batch_concurrency=4,
        batch_slots=4,
    )
    fake_ollama.config.token_interval = 0.03  # ~0.25 s a line: several are running at the kill
    data = ("\n".join(json.dumps(chat_line(i)) for i in range(LINES)) + "\n").encode()
    async with Edge(fast) as edge:
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        generator, batcher = Generator(fast), BatcherService(fast, ack_wait_s=2.0)
        await generator.start()
        await batcher.start()
        try:
            t0 = time.monotonic()
            uploaded = await sdk.files.create(file=("in.jsonl", data), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

            async def counts() -> tuple[str, int]:
                try:
                    got = await sdk.batches.retrieve(batch.id)
                except openai.APIError:  # 503 while NATS is away
                    return "", -1
                return got.status, got.request_counts.completed if got.request_counts else 0

            async def some_done() -> bool:
                return (await counts())[1] >= 6

            await until(some_done)
            killed = time.monotonic()
            nats_server.kill()  # SIGKILL: nothing flushed, memory streams (LLM_OUT) lost
            await asyncio.sleep(1.0)
            await nats_server.astart()  # same port, same store directory
            back = time.monotonic()

            async def completed() -> bool:
                return (await counts())[0] == "completed"

            await until(completed, 120)
            done = await sdk.batches.retrieve(batch.id)
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 0)
            assert done.output_file_id and not done.error_file_id
            output = [
                json.loads(line) for line in (await sdk.files.content(done.output_file_id)).text.splitlines()
            ]
        finally:
            await batcher.stop()
            await generator.stop(grace=0)
            await sdk.close()

    assert sorted(record["custom_id"] for record in output) == sorted(f"q{i}" for i in range(LINES))
    for record in output:
        i = int(record["custom_id"][1:])
        assert record["response"]["body"]["choices"][0]["message"]["content"] == await expected(
            fake_ollama, i
        )
    # Never run twice: each line's generation reached its end at most once at the model server.
    finished = Counter(
        call.body["messages"][-1]["content"]
        for call in fake_ollama.calls
        if call.path == "/api/chat" and call.body.get("stream", True) and not call.disconnected
    )
    twice = {q for q, n in finished.items() if n > 1}
    runs = [  # (line, started, finished) in seconds after the upload, for a failure's message
        (c.body["messages"][-1]["content"], round(c.started_at - t0, 2), round((c.finished_at or 0) - t0, 2))
        for c in fake_ollama.calls
        if c.path == "/api/chat" and c.body["messages"][-1]["content"] in twice
    ]
    assert not twice, {"killed": round(killed - t0, 2), "back": round(back - t0, 2), "runs": runs}
