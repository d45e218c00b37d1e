"""llmbus's own batch API: `POST /v1/batches` with the lines inline, its progress as SSE
(`progress` events with the counts, then `done`), the answers as JSONL in the native shapes; the
same batch read through OpenAI's Batch API."""

from __future__ import annotations

import json

import httpx
import msgspec

from contracts.batches import BatchDone, BatchProgress
from services.batcher.main import BatcherService
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events
from tests.test_batches import MODEL, expected

LINES = 8


def chat(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}]}


async def test_a_native_batch_streams_its_progress_and_answers_in_native_shapes(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    fast = msgspec.structs.replace(settings, ack_wait_s=2.0, batch_concurrency=2)
    fake_ollama.config.token_interval = 0.02
    lines: list[dict[str, object]] = [{"custom_id": f"q{i}", "body": chat(i)} for i in range(LINES)]
    lines.append({"body": {**chat(99), "temprature": 0}})  # a typo: this line fails, the rest run
    async with Edge(fast) as edge, httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        generator, batcher = Generator(fast), BatcherService(fast)
        await generator.start()
        await batcher.start()
        try:
            body = {"endpoint": "/v1/chat", "lines": lines, "metadata": {"k": "v"}, "stream": True}
            async with http.stream("POST", "/v1/batches", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [event async for event in sse_events(response)]
            *steps, last = events
            assert {step.event for step in steps} == {"progress"} and last.event == "done"
            progress = [msgspec.convert(step.data, BatchProgress) for step in steps]
            done = msgspec.convert(last.data, BatchDone)
            done_counts = [p.completed + p.failed for p in progress]
            assert done_counts == sorted(done_counts)  # counts only grow
            assert (done.status, done.total, done.completed, done.failed) == (
                "completed",
                LINES + 1,
                LINES,
                1,
            )

            shown = (await http.get(f"/v1/batches/{done.batch_id}")).json()
            assert shown["status"] == "completed" and shown["metadata"] == {"k": "v"}
            assert shown["endpoint"] == "/v1/chat"
            openai_view = (await http.get(f"/openai/v1/batches/{done.batch_id}")).json()
            assert openai_view["output_file_id"] == done.output_file_id

            output = await http.get(f"/v1/batches/{done.batch_id}/output")
            assert output.status_code == 200
            records = [json.loads(line) for line in output.text.splitlines()]
            answers = {r["custom_id"]: r["response"]["body"] for r in records if r["error"] is None}
            assert sorted(answers) == sorted(f"q{i}" for i in range(LINES))
            for custom_id, answer in answers.items():
                assert answer["text"] == await expected(
                    fake_ollama, int(custom_id[1:])
                )  # a native Completion
                assert answer["finish_reason"] == "stop"
            [bad] = [r for r in records if r["error"] is not None]
            assert bad["custom_id"] == str(LINES) and "temprature" in bad["error"]["message"]

            # The events of a finished batch: its `done` at once.
            async with http.stream("GET", f"/v1/batches/{done.batch_id}/events") as response:
                again = [event async for event in sse_events(response)]
            assert [event.event for event in again] == ["done"]
        finally:
            await batcher.stop()
            await generator.stop(grace=0)


async def test_the_native_batch_api_refuses_what_it_cannot_take(settings: Settings) -> None:
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        empty = await http.post("/v1/batches", json={"endpoint": "/v1/chat", "lines": []})
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "bad_request"
        other = await http.post("/v1/batches", json={"endpoint": "/v1/responses", "lines": [{"body": {}}]})
        assert other.status_code == 400
        for path in (
            "/v1/batches/batch-nope",
            "/v1/batches/batch-nope/events",
            "/v1/batches/batch-nope/output",
        ):
            missing = await http.get(path)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        created = await http.post("/v1/batches", json={"endpoint": "/v1/chat", "lines": [{"body": chat(0)}]})
        assert created.status_code == 200
        batch_id = created.json()["id"]
        early = await http.get(f"/v1/batches/{batch_id}/output")  # no batcher runs: not written yet
        assert early.status_code == 400
        cancelled = await http.post(f"/v1/batches/{batch_id}/cancel")
        assert cancelled.json()["status"] == "cancelling"
