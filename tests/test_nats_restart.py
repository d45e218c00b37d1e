"""NATS killed and restarted under load with every service running (`llmbus up`, real processes).

A restarted nats-server has lost what it kept in memory: `LLM_OUT` (every request's events and
the edge's `accepted` records) and the memory KV buckets. Every service re-creates what it owns
on reconnect (`bus.reconnects`), workers republish the events of running requests, the edge its
`accepted` records, and `llmbus up` restarts nats-server like any other child. Every request
accepted before, during or after the restart ends with exactly one terminal event, nothing stays
in `LLM_REQ`, and deferred requests can be followed by their events URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
import pytest

from contracts import subjects
from services.runtime.nats_server import free_port
from tests import llmbus_up
from tests.answers import Audit, full_answer
from tests.sse import sse_events

MODEL = "llama3.2:1b"


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question number {i}: tell me about rivers"}]


async def stream_chat(http: httpx.AsyncClient, i: int) -> list[dict[str, Any]]:
    body = {"model": MODEL, "messages": messages(i), "stream": True, "timeout": 120}
    try:
        async with http.stream("POST", "/v1/chat", json=body) as response:
            if response.status_code != 200:
                return [{"type": "refused", "status": response.status_code}]
            return [event.data async for event in sse_events(response)]
    except httpx.HTTPError as exc:
        return [{"type": "refused", "status": repr(exc)}]


async def deferred(http: httpx.AsyncClient, i: int) -> str | None:
    body = {"model": MODEL, "messages": messages(i), "stream": "deferred", "timeout": 120}
    response = await http.post("/v1/chat", json=body)
    return str(response.json()["request_id"]) if response.status_code == 202 else None


async def events_of(http: httpx.AsyncClient, request_id: str, within: float = 60) -> list[dict[str, Any]]:
    """The request's events from its events URL, retried while it answers 404/503 (NATS returning)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.HTTPError):
            async with http.stream("GET", f"/v1/requests/{request_id}/events") as response:
                if response.status_code == 200:
                    return [event.data async for event in sse_events(response)]
                status = response.status_code
        if time.monotonic() > deadline:
            raise AssertionError(f"events of {request_id}: still {status} after {within:g} s")
        await asyncio.sleep(0.5)


def nats_process(up: llmbus_up.Up) -> psutil.Process:
    [server] = [p for p in psutil.Process(up.proc.pid).children() if p.name().startswith("nats-server")]
    return server


@pytest.fixture
async def ollama() -> AsyncIterator[str]:
    """The fake Ollama as a process: 40 tokens, one every 50 ms (a stream lasts 2 s)."""
    port = free_port()
    fake = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.fakes.ollama", "--port", str(port)),
        *("--tokens", "40", "--token-interval", "0.05"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert fake.stdout is not None
    try:
        await llmbus_up.read_until(fake.stdout, "listening", 10)
        yield f"http://127.0.0.1:{port}"
    finally:
        if fake.returncode is None:
            fake.kill()
            await fake.wait()


async def queued(up: llmbus_up.Up, tmp_path: Path) -> int:
    """Messages in LLM_REQ, as the admin user."""
    credentials = json.loads((tmp_path / "data" / "nats" / "credentials.json").read_text())
    nc = await nats.connect(f"nats://127.0.0.1:{up.nats_port}", user="admin", password=credentials["admin"])
    try:
        return (await nc.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages
    finally:
        await nc.close()


async def kill_nats(up: llmbus_up.Up, output: list[str]) -> int:
    """SIGKILL to `llmbus up`'s nats-server (what it kept in memory is gone); returns once
    `llmbus up` says it restarts it (same port, same store); the killed pid."""
    killed = nats_process(up)
    killed.kill()
    async with asyncio.timeout(15):
        while not any("nats-server exited; restarting it" in line for line in output):
            await asyncio.sleep(0.1)
    return killed.pid


@pytest.mark.timeout(300)
async def test_nats_killed_under_load_with_every_service_running(tmp_path: Path, ollama: str) -> None:
    up = await llmbus_up.start(tmp_path, LLMBUS_OLLAMA_URL=ollama, LLMBUS_ACK_WAIT_S="3")
    output: list[str] = []

    async def drain() -> None:  # keep reading, or `llmbus up` blocks on a full pipe
        assert up.proc.stdout is not None
        while line := await up.proc.stdout.readline():
            output.append(line.decode())

    try:
        await up.read_until("edge ready", 60)
        reader = asyncio.create_task(drain())
        rng = random.Random(23)
        async with httpx.AsyncClient(base_url=up.url, timeout=180) as http:
            before = [await deferred(http, 1000 + i) for i in range(8)]

            async def one(i: int) -> list[dict[str, Any]]:
                await asyncio.sleep(rng.uniform(0, 3))  # arrivals before, during and after the kill
                return await stream_chat(http, i)

            load = [asyncio.create_task(one(i)) for i in range(24)]
            await asyncio.sleep(1.5)
            killed_at = time.monotonic()
            killed = await kill_nats(up, output)
            results = await asyncio.gather(*load)
            recovered_in = time.monotonic() - killed_at
            after = [await deferred(http, 2000 + i) for i in range(4)]
            followed = {rid: await events_of(http, rid) for rid in [*before, *after] if rid is not None}
            assert nats_process(up).pid != killed

        answers = {i: await full_answer(ollama, MODEL, messages(i)) for i in range(24)}
        audits = [Audit.of(r, answers[i]) for i, r in enumerate(results) if r[0]["type"] != "refused"]
        ends = {
            rid: [e["type"] for e in evs if e["type"] in ("done", "error")] for rid, evs in followed.items()
        }
        line = (
            f"nats restart under load: streams={len(results)} refused={len(results) - len(audits)} "
            f"done={sum(a.done for a in audits)} seamless={sum(a.seamless for a in audits)} "
            f"one_terminal={sum(a.terminals == 1 for a in audits)} "
            f"deferred={len(followed)} deferred_done={sum(e == ['done'] for e in ends.values())} "
            f"recovered_in={recovered_in:.1f}s"
        )
        print(line)
        assert all(a.terminals == 1 for a in audits), line
        assert all(e == ["done"] for e in ends.values()), (line, ends)
        assert len(followed) == 12 and None not in before + after, line
        assert len(audits) >= 20, line  # refused only in the seconds NATS was down (503, retry)
        assert all(a.done for a in audits), line
        async with asyncio.timeout(15):  # nothing stranded: every request acked
            while await queued(up, tmp_path):
                await asyncio.sleep(0.2)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await up.stop()
    finally:
        await up.kill()
