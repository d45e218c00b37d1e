"""Fail fast, say why: what a command and a service do when NATS is down or refuses them, and what
`llmbus` tells an operator about its configuration. Real processes, real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.runtime.nats_server import NatsServer, free_port

LLMBUS = [sys.executable, "-m", "services.cli"]


def run(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMBUS, *args], env=os.environ | env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_command_against_a_closed_port_says_so_in_one_line_within_5_s() -> None:
    port = free_port()
    started = time.monotonic()
    done = run("models", "list", LLMBUS_NATS_URL=f"nats://127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"cannot reach NATS at nats://127.0.0.1:{port}: connection refused "
        "(is nats-server running there? `llmbus up` starts one)"
    ]


async def test_a_command_with_other_credentials_says_authorization_violation(tmp_path: Path) -> None:
    server = await NatsServer(tmp_path / "nats", auth=True).astart()  # no anonymous user
    try:
        started = time.monotonic()
        done = await asyncio.to_thread(
            run,
            "dlq",
            "list",
            LLMBUS_NATS_URL=server.url,
            LLMBUS_NATS_USER="dlq",
            LLMBUS_NATS_PASSWORD="wrong",
        )
        assert time.monotonic() - started < 5
        assert done.returncode == 1
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"cannot reach NATS at {server.url}: authorization violation")
    finally:
        await server.astop()


async def test_a_service_waiting_for_nats_logs_where_and_stops_on_sigterm_within_2_s() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = os.environ | {"LLMBUS_NATS_URL": url, "LLMBUS_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(*LLMBUS, "generator", env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        lines = []
        async with asyncio.timeout(20):
            while not any("retrying in" in line for line in lines):
                lines.append(json.loads(await proc.stderr.readline())["msg"])
        assert f"connecting to NATS at {url}" in lines
        assert any(line.startswith(f"cannot reach NATS at {url}: connection refused") for line in lines)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 2) == 0
        assert time.monotonic() - started < 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_edge_is_live_before_nats_and_ready_once_connected(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    env = os.environ | {
        "LLMBUS_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_INSTANCE_ID": "edge-under-test",
    }
    proc = await asyncio.create_subprocess_exec(*LLMBUS, "edge", env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    server = None
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            async with asyncio.timeout(20):
                while True:
                    try:
                        if (await http.get("/health/live")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            ready = await http.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["nats"] is False and ready.json()["instance"] == "edge-under-test"
            refused = await http.post("/v1/generate", json={"model": "m", "prompt": "hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "bus_unavailable"

            server = await NatsServer(tmp_path / "nats", port=nats_port).astart()
            async with asyncio.timeout(20):  # connected: `nats` true (no generator, so not ready)
                while not (await http.get("/health/ready")).json()["nats"]:
                    await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) in (0, -signal.SIGTERM)  # uvicorn re-raises it
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if server is not None:
            await server.astop()


async def test_the_edge_waiting_for_nats_stops_on_sigterm_within_2_s() -> None:
    http_port = free_port()
    env = os.environ | {
        "LLMBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "LLMBUS_HTTP_PORT": str(http_port),
    }
    proc = await asyncio.create_subprocess_exec(*LLMBUS, "edge", env=env, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(timeout=2) as http, asyncio.timeout(20):
            while True:
                try:
                    await http.get(f"http://127.0.0.1:{http_port}/health/live")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_mistyped_variable_is_named_with_the_closest_setting() -> None:
    done = run("config", LLMBUS_CONCURENCY="4", LLMBUS_HTTP_PORT="9999")
    assert done.returncode == 0
    assert "unknown variable LLMBUS_CONCURENCY is ignored; did you mean LLMBUS_CONCURRENCY?" in done.stderr
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in done.stdout.splitlines()}
    assert rows["LLMBUS_HTTP_PORT"].split()[0] == "9999"
    assert rows["LLMBUS_HTTP_PORT"].endswith("environment (LLMBUS_HTTP_PORT)")
    assert rows["LLMBUS_CONCURRENCY"].split() == ["16", "default"]


async def test_a_service_warns_about_a_mistyped_variable_at_start() -> None:
    env = os.environ | {
        "LLMBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "LLMBUS_CONCURENCY": "4",
        "LLMBUS_LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(*LLMBUS, "embedder", env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        first = json.loads(await asyncio.wait_for(proc.stderr.readline(), 20))
        assert first["level"] == "warning"
        assert (
            first["msg"] == "unknown variable LLMBUS_CONCURENCY is ignored; did you mean LLMBUS_CONCURRENCY?"
        )
    finally:
        proc.kill()
        await proc.wait()


def test_version_and_the_variables_each_command_reads() -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("llmbus ")
    edge = run("edge", "--help").stdout
    assert "LLMBUS_HTTP_PORT" in edge and "LLMBUS_NATS_URL" in edge and "LLMBUS_EMBED_MAX_BATCH" not in edge
    assert "LLMBUS_EMBED_MAX_BATCH" in run("embedder", "--help").stdout
    assert "LLMBUS_NATS_URL" in run("models", "--help").stdout


def test_every_setting_is_in_a_group_so_some_help_lists_it() -> None:
    from services.runtime.settings import GROUPS, Settings

    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(Settings.__struct_fields__)
