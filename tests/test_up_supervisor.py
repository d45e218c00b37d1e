"""`llmbus up` as a supervisor an operator can trust: it refuses taken ports, knows its own edge,
gives up on a crash loop with the reason, and leaves no child behind whatever kills it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import psutil

from services import up as supervisor
from services.runtime.nats_server import free_port
from tests import llmbus_up


async def test_a_taken_http_port_is_refused_with_its_name_and_the_way_out(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        up = await llmbus_up.start(
            tmp_path, LLMBUS_HTTP_PORT=str(port), LLMBUS_LOG_FORMAT="json", LLMBUS_LOCAL="off"
        )
        try:
            assert await asyncio.wait_for(up.proc.wait(), 10) != 0
            assert up.proc.stdout is not None
            lines = [json.loads(line) for line in (await up.proc.stdout.read()).decode().splitlines()]
        finally:
            await up.kill()
        assert time.monotonic() - started < 10
        [refusal] = [line for line in lines if line["level"] == "error"]
        assert f"HTTP port {port}" in refusal["msg"] and "LLMBUS_HTTP_PORT" in refusal["msg"]
        assert refusal["service"] == "llmbus-up"
        assert not (tmp_path / "data" / "nats").exists()  # refused before starting anything


def test_readiness_counts_only_our_own_edge() -> None:
    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ready": True, "instance": "somebody-else"}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        never = threading.Event()
        assert not supervisor.wait_ready(url, "ours", 1.0, never)
        assert supervisor.wait_ready(url, "somebody-else", 1.0, never)
    finally:
        server.shutdown()
        server.server_close()


async def test_a_crash_loop_stops_the_stack_with_the_services_last_lines(tmp_path: Path) -> None:
    # A generator that cannot start (an invalid model list) exits at once, every time.
    up = await llmbus_up.start(tmp_path, LLMBUS_GENERATE_MODELS="bad model name", LLMBUS_LOCAL="off")
    try:
        output = await up.read_until("stopping everything", 60)
        assert "generator exited with 1; restarting in" in output
        assert f"generator crashed {supervisor.CRASH_LIMIT} times within 60 s" in output
        rest = await asyncio.wait_for(up.proc.stdout.read(), 60)  # type: ignore[union-attr]
        assert "LLMBUS_GENERATE_MODELS" in output + rest.decode()  # its last lines name the cause
        assert await asyncio.wait_for(up.proc.wait(), 30) == 1
        assert llmbus_up.port_closed(up.http_port) and llmbus_up.port_closed(up.nats_port)
    finally:
        await up.kill()


async def test_sigkill_of_up_leaves_no_child_running(tmp_path: Path) -> None:
    up = await llmbus_up.start(tmp_path, LLMBUS_LOCAL="off")
    try:
        await up.read_until("edge ready", 60)
        children = psutil.Process(up.proc.pid).children(recursive=True)
        assert len(children) >= 6  # nats-server and five services
        up.proc.send_signal(signal.SIGKILL)
        await up.proc.wait()
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 15)
        assert alive == [], [p.cmdline() for p in alive]
        assert llmbus_up.port_closed(up.http_port) and llmbus_up.port_closed(up.nats_port)
    finally:
        await up.kill()


async def test_a_killed_service_is_restarted(tmp_path: Path) -> None:
    up = await llmbus_up.start(tmp_path, LLMBUS_LOCAL="off", LLMBUS_NATS_PORT=str(free_port()))
    try:
        await up.read_until("edge ready", 60)
        [embedder] = [
            p
            for p in psutil.Process(up.proc.pid).children()
            if p.cmdline()[-2:] == ["services.cli", "embedder"]
        ]
        embedder.kill()
        await up.read_until("embedder exited with -9; restarting in", 20)
        async with asyncio.timeout(20):
            while not any(
                p.cmdline()[-1:] == ["embedder"] and p.pid != embedder.pid
                for p in psutil.Process(up.proc.pid).children()
            ):
                await asyncio.sleep(0.1)
        await up.stop()
    finally:
        await up.kill()


async def test_an_installed_ollama_that_is_not_running_is_served_by_the_stack(tmp_path: Path) -> None:
    # `ollama` on PATH: the faithful fake of its HTTP API, on OLLAMA_HOST as `ollama serve` listens.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ollama = bin_dir / "ollama"
    serve = f'exec {sys.executable} -m tests.fakes.ollama --port "${{OLLAMA_HOST##*:}}"'
    ollama.write_text(f'#!/bin/sh\n[ "$1" = serve ] || exit 2\n{serve}\n')
    ollama.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    up = await llmbus_up.start(tmp_path, PATH=path, LLMBUS_LOCAL="off")
    try:
        output = await up.read_until("edge ready", 60)
        assert f"Ollama installed ({ollama}) but not running" in output
        body = {"model": "llama3.2:1b", "prompt": "hi"}
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(f"{up.url}/v1/generate", json=body)
        assert answer.status_code == 200 and answer.json()["finish_reason"] == "stop"
        served = [p for p in psutil.Process(up.proc.pid).children() if "tests.fakes.ollama" in p.cmdline()]
        assert len(served) == 1
        await up.stop()
        assert not served[0].is_running() or served[0].status() == psutil.STATUS_ZOMBIE
    finally:
        await up.kill()
