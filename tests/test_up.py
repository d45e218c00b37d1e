"""`llmbus up` as a user runs it: real processes, ports from the environment, Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx

from services.runtime.nats_server import free_port
from tests.sse import collect


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before {marker!r}; output: {''.join(lines)}")
            lines.append(line)
            if marker in line:
                return lines


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_up_runs_the_stack_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    ollama_port, http_port, nats_port = free_port(), free_port(), free_port()
    fake = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.ollama", "--port", str(ollama_port), stdout=asyncio.subprocess.PIPE
    )
    assert fake.stdout is not None
    # Listening before `llmbus up` looks: with no Ollama it would start the embedded model instead.
    await _read_until(fake.stdout, "listening", 10)
    env = {
        **os.environ,
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_NATS_PORT": str(nats_port),
        "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{ollama_port}",
        "LLMBUS_DATA_DIR": str(tmp_path / "data"),
    }
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert up.stdout is not None
        banner = "".join(await _read_until(up.stdout, "edge ready", 60))
        assert f"http://127.0.0.1:{http_port}" in banner
        assert f"http://127.0.0.1:{ollama_port}" in banner  # says where model calls go

        body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("POST", f"http://127.0.0.1:{http_port}/v1/chat", json=body) as response,
        ):
            events = await collect(response)
        assert events[-1].event == "done"

        up.send_signal(signal.SIGINT)
        await _read_until(up.stdout, "stopped", 40)
        assert await asyncio.wait_for(up.wait(), 10) == 0
        assert _port_closed(http_port)
        assert _port_closed(nats_port)
    finally:
        for proc in (up, fake):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_up_says_when_the_backend_is_unreachable(tmp_path: Path) -> None:
    http_port, nats_port = free_port(), free_port()
    env = {
        **os.environ,
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_NATS_PORT": str(nats_port),
        "LLMBUS_OLLAMA_URL": "http://127.0.0.1:9",
        "LLMBUS_LOCAL": "off",  # with the `local` extra, the embedded llama.cpp would answer instead
        "LLMBUS_DATA_DIR": str(tmp_path / "data"),
    }
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert up.stdout is not None
        output = "".join(await _read_until(up.stdout, "edge ready", 60))
        assert "NOT REACHABLE" in output
        async with httpx.AsyncClient(timeout=10) as http:
            body = {"model": "llama3.2:1b", "prompt": "hi"}
            response = await http.post(f"http://127.0.0.1:{http_port}/v1/generate", json=body)
        assert response.json()["error"]["code"] == "backend_unavailable"
        up.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(up.wait(), 40) == 0
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
