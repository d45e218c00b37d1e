"""`llmbus up`: the local stack as separate processes, supervised.

Embedded nats-server first, then each service as its own process (as in production). Children run
in sessions of their own, so a terminal's Ctrl-C reaches only this supervisor, which stops the
services gracefully and then NATS; and they get SIGTERM from Linux if the supervisor dies by any
signal (services/runtime/children.py). A child that crashes is restarted after a capped exponential
backoff; one that crashes `CRASH_LIMIT` times within a minute stops the whole stack, with its last
log lines, and `llmbus up` exits non-zero.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import httpx
import msgspec

from services import provision
from services.local import launch
from services.runtime import logs, scrape_targets
from services.runtime.children import die_with_parent
from services.runtime.nats_server import NatsServer
from services.runtime.retry import Backoff
from services.runtime.settings import Settings, unknown_variables

# Every long-running service: `llmbus NAME` runs `services.NAME.main.main(settings)`, and
# `llmbus up` starts each as its own process, in this order.
SERVICES = ("generator", "embedder", "classifier", "janitor", "ledger", "batcher", "edge")
# Started by `llmbus up` only when needed: the embedded model servers (the `local` extra).
ON_DEMAND = ("local",)

CRASH_LIMIT = 5  # crashes of one child within CRASH_WINDOW_S that stop the stack
CRASH_WINDOW_S = 60.0
RESTART_BACKOFF = Backoff(retries=CRASH_LIMIT, base_s=0.5, max_s=8.0)
TAIL_LINES = 20  # a child's last log lines, shown when it takes the stack down

log = logging.getLogger("llmbus.up")


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on `host:port` (a port in TIME_WAIT is free: servers reuse it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def taken_ports(settings: Settings) -> list[str]:
    """One line per port `llmbus up` needs that another process holds."""
    wanted = [(settings.http_host, settings.http_port, "LLMBUS_HTTP_PORT", "HTTP")]
    wanted.append(("127.0.0.1", settings.nats_port, "LLMBUS_NATS_PORT", "NATS"))
    return [
        f"the {what} port {port} on {host} is already in use by another process; "
        f"stop it or choose another port: {var}=<port> llmbus up"
        for host, port, var, what in wanted
        if port_taken(host, port)
    ]


class Child:
    """One supervised service: its process, its last log lines, its recent crashes."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.crashes: list[float] = []
        self.restart_at: float | None = None
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - fork-safe, see services/runtime/children.py
        )
        assert proc.stdout is not None
        threading.Thread(target=self._relay, args=(proc.stdout,), daemon=True).start()
        return proc

    def _relay(self, stream: IO[bytes]) -> None:
        """Passes the child's lines through to our stdout, keeping the last few."""
        for raw in stream:
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip("\n"))
            sys.stdout.write(line)
            sys.stdout.flush()

    def crashed(self, now: float) -> int:
        """Records a crash; the number within the window."""
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW_S] + [now]
        return len(self.crashes)

    def restart(self) -> None:
        self.restart_at = None
        self.proc = self._spawn()


def wait_ready(url: str, instance: str, timeout: float, stopping: threading.Event) -> bool:
    """Until `/health/ready` answers 200 from *our* edge (its instance id): another process that
    happens to answer on the port does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping.is_set():
        try:
            answer = httpx.get(f"{url}/health/ready", timeout=1)
            if answer.status_code == 200 and answer.json().get("instance") == instance:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        stopping.wait(0.2)
    return False


def up(settings: Settings) -> int:
    logs.setup(settings.log_level, "llmbus-up", settings.log_format)
    if logs.is_text(settings.log_format):
        logs.use_formatter(logging.Formatter("llmbus: %(message)s"))  # the supervisor's own voice
    for warning in unknown_variables():
        log.warning(warning)
    taken = taken_ports(settings)
    for line in taken:
        log.error(line)
    if taken:
        return 2

    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    if not settings.metrics_port and "LLMBUS_METRICS_PORT" not in os.environ:  # on, at known ports
        settings = msgspec.structs.replace(settings, metrics_port=scrape_targets.DEFAULT_BASE_PORT)
    backend = launch.plan(settings)  # Ollama, a configured server, or the embedded llama.cpp
    data = Path(settings.data_dir).resolve()
    # Permissions on: one NATS user per service (services/runtime/nats_auth.py), passwords
    # generated once into <data>/nats/credentials.json, where `llmbus models|dlq` find theirs.
    nats = NatsServer(data / "nats", port=settings.nats_port, auth=True, die_with_parent=True).start()
    log.info(f"NATS with JetStream at {nats.url} (data in {data / 'nats'}, users in {nats.credentials_file})")
    instance = uuid.uuid4().hex
    # Streams created, or brought to these settings, as admin: the services may only create.
    admin = msgspec.structs.replace(
        settings, nats_url=nats.url, nats_user="admin", nats_password=nats.credentials["admin"]
    )
    try:
        asyncio.run(provision.provision(admin))
    except Exception as exc:
        log.error("cannot provision the streams: %s; stopping", exc)
        nats.stop()
        return 1
    children = _start_children(settings, backend, nats, instance, stopping)

    edge_url = f"http://{settings.http_host}:{settings.http_port}"
    found = scrape_targets.targets(settings, list(children))
    file_sd = data / "prometheus" / "targets.json"
    scrape_targets.write_file_sd(file_sd, found)
    listed = ", ".join(f"{role} {address}" for role, address in found.items())
    log.info(f"metrics (/metrics): {listed}; Prometheus file-SD: {file_sd}")
    log.info(f"model backend: {backend.message}")
    if backend.local and not launch.wait_local(backend, children["local"].proc, stopping.is_set):
        log.warning("the embedded model servers did not start; see the `local` log above")
    if wait_ready(edge_url, instance, 30, stopping):
        log.info(f"edge ready at {edge_url}  (API docs: {edge_url}/schema)  — Ctrl-C stops everything")
    elif not stopping.is_set():
        log.warning(f"edge at {edge_url} is not ready yet; see the service logs above")

    status = 0
    try:
        while not stopping.wait(0.2):
            status = _supervise(children, nats)
            if status:
                break
    finally:
        log.info("stopping")
        _stop(children.values(), settings.shutdown_grace_s + 5)
        nats.stop()
        log.info("stopped")
    return status


def _start_children(
    settings: Settings, backend: launch.Plan, nats: NatsServer, instance: str, stopping: threading.Event
) -> dict[str, Child]:
    """`ollama serve` when it is installed but not running, the embedded model servers when they
    are the backend, then every service, each as its own NATS user with only its own password."""
    env = {**os.environ, **settings.to_env(), "LLMBUS_NATS_URL": nats.url, **backend.env}
    passwords = nats.credentials
    children: dict[str, Child] = {}
    if backend.ollama is not None:
        children["ollama"] = Child("ollama", backend.ollama, os.environ | launch.ollama_env(settings))
        if not launch.wait_ollama(settings.generate_url, children["ollama"].proc, stopping.is_set):
            log.warning("`ollama serve` did not answer within 30 s; see its log above")
    for role in ("local", *SERVICES) if backend.local else SERVICES:
        own = {"LLMBUS_NATS_USER": role, "LLMBUS_NATS_PASSWORD": passwords[role]} if role in passwords else {}
        if role == "edge":
            own["LLMBUS_INSTANCE_ID"] = instance  # how `wait_ready` knows its own edges
        for replica, name in enumerate(replica_names(role, settings)):
            own["LLMBUS_REPLICA"] = str(replica)
            children[name] = Child(name, [sys.executable, "-m", "services.cli", role], env | own)
    return children


def replica_names(role: str, settings: Settings) -> list[str]:
    """The processes of `role` that `llmbus up` runs: `edge`, `edge-2`, ... (`LLMBUS_EDGE_WORKERS`,
    `LLMBUS_GENERATORS`; one of every other role)."""
    count = {"edge": settings.edge_workers, "generator": settings.generators}.get(role, 1)
    return [role if i == 0 else f"{role}-{i + 1}" for i in range(count)]


def _supervise(children: dict[str, Child], nats: NatsServer) -> int:
    """One look at every child: restart the crashed after their backoff; non-zero when one crashes
    too often (the stack stops)."""
    now = time.monotonic()
    if nats.proc is None or nats.proc.poll() is not None:
        log.warning("nats-server exited; restarting it (its log: %s)", nats.log_path)
        try:
            nats.start()
        except RuntimeError as exc:
            log.error("%s; stopping everything", exc)
            return 1
    for child in children.values():
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart()
            continue
        code = child.proc.poll()
        if code is None:
            continue
        crashes = child.crashed(now)
        if crashes >= CRASH_LIMIT:
            log.error(
                f"{child.name} crashed {crashes} times within {CRASH_WINDOW_S:g} s (last exit code {code}); "
                f"stopping everything. Its last lines:\n" + "\n".join(child.tail)
            )
            return 1
        delay = RESTART_BACKOFF.delay(crashes - 1)
        log.warning(f"{child.name} exited with {code}; restarting in {delay:.1f} s")
        child.restart_at = now + delay
    return 0


def _stop(children: Iterable[Child], grace: float) -> None:
    """SIGTERM to every child, then SIGKILL to whichever has not exited within `grace`."""
    procs = [child.proc for child in children]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
