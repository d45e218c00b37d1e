"""`llmbus up` with several edges and generators (`LLMBUS_EDGE_WORKERS`, `LLMBUS_GENERATORS`):
the edges share the HTTP port, each process has its own metrics port, and the work spreads."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx

from services.runtime import metrics
from services.runtime.nats_server import free_port
from tests import llmbus_up

BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _total(scraped: str, family: str) -> float:
    """The sum of a counter family's samples in Prometheus text."""
    pattern = re.compile(rf"^{family}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(scraped))


async def _ready(http: httpx.AsyncClient, url: str, patience: float = 60.0) -> None:
    async with asyncio.timeout(patience):
        while True:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)


async def test_up_runs_several_edges_on_one_port_and_several_generators(tmp_path: Path) -> None:
    ollama_port = free_port()
    fake = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.ollama", "--port", str(ollama_port), stdout=asyncio.subprocess.PIPE
    )
    assert fake.stdout is not None
    await llmbus_up.read_until(fake.stdout, "listening", 10)
    base = free_port()
    up = await llmbus_up.start(
        tmp_path,
        LLMBUS_OLLAMA_URL=f"http://127.0.0.1:{ollama_port}",
        LLMBUS_METRICS_PORT=str(base),
        LLMBUS_EDGE_WORKERS="2",
        LLMBUS_GENERATORS="2",
    )
    try:
        banner = await up.read_until("edge ready", 60)
        edges = [metrics.port_for("edge", base, replica) for replica in (0, 1)]
        generators = [metrics.port_for("generator", base, replica) for replica in (0, 1)]
        assert len(set(edges + generators)) == 4
        names = ("edge", "edge-2", "generator", "generator-2")
        for name, port in zip(names, edges + generators, strict=True):
            assert f"{name} 127.0.0.1:{port}" in banner
        groups = json.loads((tmp_path / "data" / "prometheus" / "targets.json").read_text())
        by_process = {g["labels"]["process"]: (g["labels"]["service"], g["targets"]) for g in groups}
        assert by_process["edge-2"] == ("llmbus-edge", [f"127.0.0.1:{edges[1]}"])
        assert by_process["generator-2"] == ("llmbus-generator", [f"127.0.0.1:{generators[1]}"])

        async with httpx.AsyncClient(timeout=10) as http:
            for port in edges:
                await _ready(http, f"http://127.0.0.1:{port}/health/ready")
            for port in generators:
                await _ready(http, f"http://127.0.0.1:{port}/metrics")

        async def one() -> None:
            # A connection of its own each: the kernel picks an edge per connection.
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(f"{up.url}/v1/chat", json=BODY)
                assert answer.status_code == 200, answer.text

        for _ in range(4):
            await asyncio.gather(*(one() for _ in range(16)))

        async with httpx.AsyncClient(timeout=10) as http:
            per_edge = [
                _total((await http.get(f"http://127.0.0.1:{port}/metrics")).text, "llmbus_requests")
                for port in edges
            ]
            per_generator = [
                _total((await http.get(f"http://127.0.0.1:{port}/metrics")).text, "llmbus_worker_requests")
                for port in generators
            ]
        assert sum(per_edge) == 64 and min(per_edge) > 0, per_edge
        assert sum(per_generator) == 64 and min(per_generator) > 0, per_generator

        await up.stop()
        assert llmbus_up.port_closed(up.http_port)
        assert all(llmbus_up.port_closed(port) for port in edges + generators)
    finally:
        await up.kill()
        if fake.returncode is None:
            fake.kill()
            await fake.wait()
