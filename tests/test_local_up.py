"""`llmbus up` on a machine without Ollama: the embedded llama.cpp answers, or a clear message."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from services.local import models
from services.runtime.nats_server import free_port
from tests.sse import collect


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before {marker!r}; output: {''.join(lines)}")
            lines.append(line)
            if marker in line:
                return "".join(lines)


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def _up(tmp_path: Path, **env: str) -> tuple[asyncio.subprocess.Process, int]:
    http_port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMBUS_")}
    environ |= {
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_NATS_PORT": str(free_port()),
        "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "LLMBUS_DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "up",
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return proc, http_port


async def _stop(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    proc.send_signal(signal.SIGINT)
    await _read_until(proc.stdout, "llmbus: stopped", 60)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


@pytest.mark.skipif(not models.installed() and not os.environ.get("CI"), reason="needs the local extra")
async def test_up_without_ollama_serves_the_embedded_model_end_to_end(tmp_path: Path) -> None:
    proc, http_port = await _up(tmp_path)
    try:
        assert proc.stdout is not None
        banner = await _read_until(proc.stdout, "edge ready", 120)
        assert "embedded llama.cpp" in banner
        assert "only demonstrates the pipeline" in banner  # says plainly what this model is for
        found = re.search(r"embedded llama\.cpp at http://127\.0\.0\.1:(\d+)", banner)
        assert found, banner
        chat_port = int(found.group(1))

        body = {
            "model": models.CHAT_MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "options": {"num_predict": 8},
        }
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream("POST", f"http://127.0.0.1:{http_port}/v1/chat", json=body) as response,
        ):
            events = await collect(response)
        assert [e.event for e in events].count("token") >= 1
        assert events[-1].event == "done"

        await _stop(proc)
        assert _port_closed(http_port)
        assert _port_closed(chat_port)  # the embedded server stopped with the stack
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_up_without_ollama_or_the_local_model_says_not_reachable(tmp_path: Path) -> None:
    proc, _ = await _up(tmp_path, LLMBUS_LOCAL="off")
    try:
        assert proc.stdout is not None
        banner = await _read_until(proc.stdout, "model backend:", 30)
        assert "NOT REACHABLE" in banner
        assert "embedded" not in banner
        await _stop(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
