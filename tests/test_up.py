"""`llmbus up` as a user runs it: real processes, ports from the environment, Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx

from services.runtime import metrics
from services.runtime.nats_server import free_port
from tests import llmbus_up
from tests.sse import collect


async def test_up_runs_the_stack_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    ollama_port = free_port()
    fake = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.ollama", "--port", str(ollama_port), stdout=asyncio.subprocess.PIPE
    )
    assert fake.stdout is not None
    # Listening before `llmbus up` looks: with no Ollama it would start the embedded model instead.
    await llmbus_up.read_until(fake.stdout, "listening", 10)
    base = free_port()
    up = await llmbus_up.start(
        tmp_path, LLMBUS_OLLAMA_URL=f"http://127.0.0.1:{ollama_port}", LLMBUS_METRICS_PORT=str(base)
    )
    try:
        banner = await up.read_until("edge ready", 60)
        assert up.url in banner
        assert f"http://127.0.0.1:{ollama_port}" in banner  # says where model calls go
        # Every role's metrics port, said and written for Prometheus' file-based discovery.
        ports = {role: metrics.port_for(role, base) for role in metrics.ROLE_OFFSETS}
        for role, port in ports.items():
            assert f"{role} 127.0.0.1:{port}" in banner
        groups = json.loads((tmp_path / "data" / "prometheus" / "targets.json").read_text())
        listed = {g["labels"]["service"]: g["targets"] for g in groups}
        assert listed["llmbus-janitor"] == [f"127.0.0.1:{ports['janitor']}"]
        assert listed["llmbus-edge"] == [f"127.0.0.1:{up.http_port}"]
        async with httpx.AsyncClient(timeout=10) as http:
            for role, family in (("generator", "llmbus_worker_requests"), ("janitor", "llmbus_janitor")):
                scraped = await http.get(f"http://127.0.0.1:{ports[role]}/metrics")
                assert family in scraped.text, role

        body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("POST", f"{up.url}/v1/chat", json=body) as response,
        ):
            events = await collect(response)
        assert events[-1].event == "done"

        await up.stop()
        assert llmbus_up.port_closed(up.http_port)
        assert llmbus_up.port_closed(up.nats_port)
    finally:
        await up.kill()
        if fake.returncode is None:
            fake.kill()
            await fake.wait()


async def test_up_says_when_the_backend_is_unreachable(tmp_path: Path) -> None:
    # Without LLMBUS_LOCAL=off the `local` extra's embedded llama.cpp would answer instead.
    up = await llmbus_up.start(tmp_path, LLMBUS_OLLAMA_URL="http://127.0.0.1:9", LLMBUS_LOCAL="off")
    try:
        output = await up.read_until("edge ready", 60)
        assert "NOT REACHABLE" in output
        async with httpx.AsyncClient(timeout=10) as http:
            body = {"model": "llama3.2:1b", "prompt": "hi"}
            response = await http.post(f"{up.url}/v1/generate", json=body)
        assert response.json()["error"]["code"] == "backend_unavailable"
        await up.stop()
    finally:
        await up.kill()
