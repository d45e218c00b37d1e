"""A batch's lines are its owner's requests: the tenant's models and limits apply to them as to
any request (here: one in flight at a time, and a model the key may not use)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import openai

from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_admission import KEYS, with_auth
from tests.test_batches import chat_line, until

LINES = 6


async def test_a_batch_keeps_to_its_owners_in_flight_limit_and_models(
    settings: Settings, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    limited = with_auth(
        settings, tmp_path, a="max_inflight = 1", ack_wait_s=2.0, batch_concurrency=4, batch_slots=4
    )
    fake_ollama.config.token_interval = 0.02
    rows = [json.dumps(chat_line(i)) for i in range(LINES)]
    forbidden = chat_line(LINES)
    forbidden["body"] = {**forbidden["body"], "model": "qwen2.5:0.5b"}  # type: ignore[dict-item]
    rows.append(json.dumps(forbidden))
    async with Edge(limited) as edge:
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key=KEYS["a"], max_retries=0)
        generator, batcher = Generator(limited), BatcherService(limited)
        await generator.start()
        await batcher.start()
        try:
            uploaded = await sdk.files.create(file=("in.jsonl", "\n".join(rows).encode()), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

            async def completed() -> bool:
                return (await sdk.batches.retrieve(batch.id)).status == "completed"

            await until(completed, 60)
            done = await sdk.batches.retrieve(batch.id)
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (LINES, 1)
            assert done.error_file_id
            errors = (await sdk.files.content(done.error_file_id)).text.splitlines()
            record = json.loads(errors[0])
            assert record["custom_id"] == f"q{LINES}"
            assert record["response"]["status_code"] == 403
            assert record["response"]["body"]["error"]["code"] == "forbidden"
        finally:
            await batcher.stop()
            await generator.stop(grace=0)
            await sdk.close()

    chats = sorted(
        (call for call in fake_ollama.calls if call.path == "/api/chat"), key=lambda call: call.started_at
    )
    assert len(chats) == LINES
    for earlier, later in itertools.pairwise(chats):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at  # one at a time
