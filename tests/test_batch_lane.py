"""The batch lane: a batch's lines wait on `llm.req.batch.generate.<model>`, and a generator takes
one only while interactive work leaves it a slot free. An interactive request sent while a batch's
lines are queued starts before the rest of them (at most the line whose slot was being filled as
it arrived starts until it ends)."""

from __future__ import annotations

import json
import time

import httpx
import msgspec
import nats
import openai

from contracts import GenerateRequest, subjects
from contracts.batches import BATCH_API
from contracts.usage import Origin
from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime import bus, handoff, usage
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_batches import MODEL, chat_line, until

LINES = 12


def _content(call_body: object) -> str:
    messages = call_body.get("messages") if isinstance(call_body, dict) else None
    return str(messages[-1]["content"]) if messages else ""


async def test_an_interactive_request_starts_before_the_queued_batch_lines(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    # One slot: without the lane the interactive request would queue behind every batch line.
    fast = msgspec.structs.replace(
        settings, ack_wait_s=2.0, concurrency=1, batch_slots=1, batch_concurrency=LINES
    )
    fake_ollama.config.token_interval = 0.05  # a line takes ~0.4 s
    data = ("\n".join(json.dumps(chat_line(i)) for i in range(LINES)) + "\n").encode()
    async with Edge(fast) as edge:
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        generator, batcher = Generator(fast), BatcherService(fast)
        await generator.start()
        await batcher.start()
        try:
            uploaded = await sdk.files.create(file=("in.jsonl", data), purpose="batch")
            batch = await sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

            async def one_done() -> bool:
                counts = (await sdk.batches.retrieve(batch.id)).request_counts
                return counts is not None and counts.completed >= 1

            await until(one_done)
            sent = time.monotonic()
            async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "interactive"}]}
                answer = await http.post("/openai/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            left = (await sdk.batches.retrieve(batch.id)).request_counts
            assert left is not None and left.completed < LINES - 2  # the batch was still running

            async def completed() -> bool:
                return (await sdk.batches.retrieve(batch.id)).status == "completed"

            await until(completed, 60)
        finally:
            await batcher.stop()
            await generator.stop(grace=0)
            await sdk.close()

    chats = [call for call in fake_ollama.calls if call.path == "/api/chat"]
    interactive = next(call for call in chats if _content(call.body) == "interactive")
    lines = [call for call in chats if _content(call.body).startswith("question")]
    assert len(lines) == LINES
    # From the request's arrival to its end, at most the line whose slot was being filled as it
    # arrived started: the generator's one slot was the interactive request's.
    assert interactive.finished_at is not None
    meanwhile = [c for c in lines if sent < c.started_at < interactive.finished_at]
    assert len(meanwhile) <= 1, [round(c.started_at - sent, 3) for c in meanwhile]


async def test_a_routed_batch_line_is_handed_on_to_the_batch_lane(settings: Settings) -> None:
    nc = await nats.connect(settings.nats_url)  # the operator
    try:
        js = nc.jetstream()
        await bus.provision(js, settings)
        for api, lane in ((BATCH_API, "llm.req.batch.generate."), ("openai", "llm.req.generate.")):
            request = GenerateRequest(id=f"routed-{api}-line", model=MODEL, prompt="hi")
            origin = usage.encode_origin(Origin(tenant="t", api=api))
            await handoff.republish(js, request, reply="llm.out.x", seq=2, deadline_ms=None, origin=origin)
            stored = await js.get_last_msg(
                subjects.REQUEST_STREAM, subjects.encode_model(MODEL).join([lane, ""])
            )
            assert msgspec.json.decode(stored.data)["id"] == request.id
    finally:
        await nc.close()
