"""`llmbus up` as a user runs it: a child process on free ports, read by its printed lines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import psutil

from services.runtime.nats_server import free_port
from tests import model_cache


class Up:
    """One `llmbus up` process, its ports and its output so far."""

    def __init__(self, proc: asyncio.subprocess.Process, http_port: int, nats_port: int) -> None:
        self.proc = proc
        self.http_port = http_port
        self.nats_port = nats_port
        self.url = f"http://127.0.0.1:{http_port}"

    async def read_until(self, marker: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        return await read_until(self.proc.stdout, marker, timeout)

    async def stop(self) -> None:
        """Ctrl-C, as a terminal sends it: the stack says it stopped and exits 0."""
        self.proc.send_signal(signal.SIGINT)
        await self.read_until("llmbus: stopped", 60)
        assert await asyncio.wait_for(self.proc.wait(), 10) == 0

    async def kill(self) -> None:
        """SIGKILL to `llmbus up` and every process it started (they run in their own sessions, so
        a failed test would otherwise leave the stack running)."""
        if self.proc.returncode is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            self.proc.kill()
            await self.proc.wait()


async def start(tmp_path: Path, unset: tuple[str, ...] = (), **env: str) -> Up:
    """`llmbus up` with no LLMBUS_* from the caller's environment but `env`; by default the Ollama
    URL is a port nothing listens on and the embedded models come from the tests' shared cache;
    the variables named in `unset` are removed."""
    http_port, nats_port = free_port(), free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMBUS_") and k not in unset}
    environ |= {
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_NATS_PORT": str(nats_port),
        "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{free_port()}",
        "LLMBUS_DATA_DIR": str(tmp_path / "data"),
        "LLMBUS_LOG_FORMAT": "text",  # `llmbus: ...` status lines, as on a terminal
        **model_cache.ENV,
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
    return Up(proc, http_port, nats_port)


async def read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:
    """The lines printed up to and including the first that contains `marker`."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before {marker!r}; output: {''.join(lines)}")
            lines.append(line)
            if marker in line:
                return "".join(lines)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
