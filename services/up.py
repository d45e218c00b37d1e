"""`llmbus up`: the local stack as separate processes, supervised.

Embedded nats-server first, then each service as its own process (as in production). A service
that dies is restarted. Ctrl-C (or SIGTERM) stops the services gracefully, then NATS. Children run
in their own sessions so a terminal's Ctrl-C reaches only this supervisor, which keeps that order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.cli import SERVICES
from services.local import launch
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings


def _say(line: str) -> None:
    print(f"llmbus: {line}", flush=True)


def _wait_ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def up(settings: Settings) -> int:
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    backend = launch.plan(settings)  # Ollama, a configured server, or the embedded llama.cpp
    data = Path(settings.data_dir).resolve()
    # Permissions on: one NATS user per service (services/runtime/nats_auth.py), passwords
    # generated once into <data>/nats/credentials.json, where `llmbus models|dlq` find theirs.
    nats = NatsServer(data / "nats", port=settings.nats_port, auth=True).start()
    _say(f"NATS with JetStream at {nats.url} (data in {data / 'nats'}, users in {nats.credentials_file})")
    env = {**os.environ, **settings.to_env(), "LLMBUS_NATS_URL": nats.url, **backend.env}
    passwords = nats.credentials
    children: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str) -> None:
        # Each service gets its own NATS user and password, nobody else's.
        own = {"LLMBUS_NATS_USER": name, "LLMBUS_NATS_PASSWORD": passwords[name]} if name in passwords else {}
        children[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", name], env=env | own, start_new_session=True
        )

    for name in ("local", *SERVICES) if backend.local else SERVICES:
        spawn(name)
    edge_url = f"http://{settings.http_host}:{settings.http_port}"
    _say(f"model backend: {backend.message}")
    if backend.local and not launch.wait_local(backend, children["local"], lambda: stopping):
        _say("the embedded model servers did not start; see the `local` log above")
    if _wait_ready(edge_url, 30):
        _say(f"edge ready at {edge_url}  (API docs: {edge_url}/schema)  — Ctrl-C stops everything")
    else:
        _say(f"edge at {edge_url} is not ready yet; see the service logs above")

    restarts: dict[str, float] = {}
    try:
        while not stopping:
            time.sleep(0.2)
            for name, proc in list(children.items()):
                # Back off a crash loop: at most one restart per second per service.
                crashed = proc.poll() is not None and not stopping
                if crashed and time.monotonic() - restarts.get(name, 0.0) > 1.0:
                    _say(f"{name} exited with {proc.returncode}; restarting")
                    restarts[name] = time.monotonic()
                    spawn(name)
    finally:
        _say("stopping")
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_s + 5
        for proc in children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        nats.stop()
        _say("stopped")
    return 0
