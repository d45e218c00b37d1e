"""Fault tests with real processes: generators killed mid-stream, SIGTERM, a NATS restart, and a
node of a 3-node cluster killed under load. The fake Ollama runs as its own process too.

The long chaos variant is `@pytest.mark.slow` (excluded by default; `pytest -m slow` runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from contracts import subjects
from services.runtime import bus
from services.runtime.nats_server import NatsServer, free_port
from services.runtime.settings import Settings
from tests.answers import Audit, full_answer
from tests.conftest import Edge
from tests.nats_cluster import NatsCluster
from tests.sse import sse_events

MODEL = "llama3.2:1b"
REPO = Path(__file__).resolve().parent.parent


# -- processes -----------------------------------------------------------------------------------


class Proc:
    """One child process in its own session, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.born = time.monotonic()
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            while self.popen.poll() is None:
                await asyncio.sleep(0.05)
        return self.popen.returncode


class FakeProcess(Proc):
    """`python -m tests.fakes.ollama` as a process, its URL read from its ready line."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(
            [sys.executable, "-m", "tests.fakes.ollama", "--port", "0", *args], dict(os.environ), log
        )

    async def ready(self, timeout: float = 20) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.log.read_text().splitlines():
                    if line.startswith("fake ollama listening on "):
                        return line.rsplit(" ", 1)[-1]
                if self.popen.poll() is not None:
                    raise RuntimeError(f"fake ollama exited: {self.log.read_text()}")
                await asyncio.sleep(0.05)


@dataclass
class Stack:
    """Generator processes (killable), an in-process edge, and what the chaos did."""

    settings: Settings
    logs: Path
    generators: list[Proc] = field(default_factory=list)
    kills: int = 0
    started: int = 0

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.settings.to_env(), "LLMBUS_LOG_LEVEL": "warning"}

    def spawn(self) -> Proc:
        self.started += 1
        proc = Proc(
            [sys.executable, "-m", "services.cli", "generator"],
            self.env(),
            self.logs / f"generator-{self.started}.log",
        )
        self.generators.append(proc)
        return proc

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a generator that has had time to start, so it is likely mid-stream."""
        now = time.monotonic()
        alive = [p for p in self.generators if p.popen.poll() is None and now - p.born > 1.5]
        if alive:
            rng.choice(alive).kill()
            self.kills += 1

    async def ready(self, count: int, timeout: float = 30) -> None:
        """Until `count` generators answer a NATS micro-service ping."""
        nc = await nats.connect(self.settings.nats_url.split(","))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    inbox = nc.new_inbox()
                    sub = await nc.subscribe(inbox)
                    await nc.publish("$SRV.PING.llmbus-generator", b"", reply=inbox)
                    await asyncio.sleep(0.3)
                    answered = sub.pending_msgs
                    await sub.unsubscribe()
                    if answered >= count:
                        return
        finally:
            await nc.close()

    def stop(self) -> None:
        for proc in self.generators:
            proc.kill()


@pytest.fixture
async def fake_process(tmp_path: Path) -> AsyncIterator[tuple[FakeProcess, str]]:
    proc = FakeProcess(tmp_path / "fake-ollama.log", "--tokens", "40", "--token-interval", "0.025")
    try:
        yield proc, await proc.ready()
    finally:
        proc.kill()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def fault_settings(nats_url: str, ollama_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "ollama_url": ollama_url,
        "http_port": free_port(),
        "ack_wait_s": 1.0,  # a dead generator's requests come back after a second
        "max_deliver": 20,  # the chaos may hit one request several times; it must still finish
        "concurrency": 16,
        "shutdown_grace_s": 5.0,
        "backend_retry_base_s": 0.05,
    }
    return Settings(**(values | changes))


def own(server: NatsServer) -> dict[str, Any]:
    """The services' own NATS users (the server runs with permissions on)."""
    return {"nats_credentials": str(server.credentials_file)}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question number {i}: tell me about rivers"}]


async def stream_chat(http: httpx.AsyncClient, i: int, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": MODEL, "messages": messages(i), "stream": True, "timeout": 120, **extra}
    async with http.stream("POST", "/v1/chat", json=body) as response:
        if response.status_code != 200:
            return [
                {"type": "refused", "status": response.status_code, "body": (await response.aread()).decode()}
            ]
        return [event.data async for event in sse_events(response)]


# -- chaos: generators killed at random points ---------------------------------------------------


async def chaos(
    server: NatsServer, ollama_url: str, logs: Path, *, requests: int, generators: int, seed: int
) -> tuple[Stack, list[Audit]]:
    rng = random.Random(seed)
    stack = Stack(fault_settings(server.url, ollama_url, **own(server)), logs)
    for _ in range(generators):
        stack.spawn()
    expected = await asyncio.gather(*(full_answer(ollama_url, MODEL, messages(i)) for i in range(requests)))
    await stack.ready(generators)
    done = asyncio.Event()

    async def killer() -> None:
        await asyncio.sleep(0.3)
        while not done.is_set():
            stack.kill_one(rng)
            stack.spawn()  # a supervisor restarts it; the survivors and it take the requests over
            await asyncio.sleep(rng.uniform(0.7, 1.3))

    async with Edge(stack.settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=180) as http:
        chaos_task = asyncio.create_task(killer())
        limit = asyncio.Semaphore(24)

        async def one(i: int) -> list[dict[str, Any]]:
            async with limit:
                await asyncio.sleep(rng.uniform(0, 2))  # arrivals spread over the kills
                return await stream_chat(http, i)

        try:
            results = await asyncio.gather(*(one(i) for i in range(requests)))
        finally:
            done.set()
            await chaos_task
            stack.stop()
    return stack, [Audit.of(events, answer) for events, answer in zip(results, expected, strict=True)]


def report(name: str, stack: Stack, audits: list[Audit]) -> str:
    taken_over = sum(len(a.attempts) > 1 for a in audits)
    line = (
        f"{name}: requests={len(audits)} generator_kills={stack.kills} taken_over={taken_over} "
        f"lost_tokens={sum(a.lost for a in audits)} duplicated_tokens={sum(a.duplicated for a in audits)} "
        f"seq_gaps={sum(a.seq_gaps for a in audits)} seq_repeats={sum(a.seq_repeats for a in audits)} "
        f"terminal_events={sum(a.terminals for a in audits)}"
    )
    print(line)
    return line


def assert_seamless(audits: list[Audit]) -> None:
    broken = [a for a in audits if not (a.seamless and a.done)]
    assert not broken, broken[0]


async def test_chaos_killing_generators_mid_stream_loses_and_repeats_no_token(
    nats_server: NatsServer, fake_process: tuple[FakeProcess, str], logs: Path
) -> None:
    stack, audits = await chaos(nats_server, fake_process[1], logs, requests=50, generators=3, seed=3)
    report("chaos", stack, audits)
    assert stack.kills >= 3
    assert sum(len(a.attempts) > 1 for a in audits) >= 1  # some answers really were taken over
    assert_seamless(audits)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_long_variant(nats_server: NatsServer, tmp_path: Path, logs: Path) -> None:
    fake = FakeProcess(tmp_path / "fake-ollama.log", "--tokens", "60", "--token-interval", "0.02")
    try:
        stack, audits = await chaos(nats_server, await fake.ready(), logs, requests=300, generators=4, seed=7)
    finally:
        fake.kill()
    report("chaos-long", stack, audits)
    assert_seamless(audits)


# -- graceful shutdown ---------------------------------------------------------------------------


async def first_tokens(
    http: httpx.AsyncClient, n: int
) -> tuple[list[asyncio.Task[list[dict[str, Any]]]], Any]:
    """Starts `n` streams and returns once each has its first token."""
    started = asyncio.Barrier(n + 1)

    async def one(i: int) -> list[dict[str, Any]]:
        body = {"model": MODEL, "messages": messages(i), "stream": True, "timeout": 60}
        out: list[dict[str, Any]] = []
        async with http.stream("POST", "/v1/chat", json=body) as response:
            async for event in sse_events(response):
                out.append(event.data)
                if event.event == "token" and sum(e["type"] == "token" for e in out) == 1:
                    await started.wait()
        return out

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    async with asyncio.timeout(30):
        await started.wait()
    return tasks, started


async def test_sigterm_lets_in_flight_streams_finish_then_exits(
    nats_server: NatsServer, fake_process: tuple[FakeProcess, str], logs: Path
) -> None:
    stack = Stack(
        fault_settings(nats_server.url, fake_process[1], shutdown_grace_s=10, **own(nats_server)), logs
    )
    generator = stack.spawn()
    async with Edge(stack.settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        tasks, _ = await first_tokens(http, 3)
        generator.signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    assert await generator.wait(15) == 0
    for i, events in enumerate(results):
        audit = Audit.of(events, await full_answer(fake_process[1], MODEL, messages(i)))
        assert audit.seamless and audit.done and audit.attempts == {1}, audit


async def test_sigterm_hands_unfinished_streams_to_another_generator(
    nats_server: NatsServer, fake_process: tuple[FakeProcess, str], logs: Path
) -> None:
    stack = Stack(
        fault_settings(nats_server.url, fake_process[1], shutdown_grace_s=0.2, **own(nats_server)), logs
    )
    first = stack.spawn()
    async with Edge(stack.settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        tasks, _ = await first_tokens(http, 3)
        first.signal(signal.SIGTERM)
        assert await first.wait(15) == 0  # naks what it could not finish, drains, exits
        stack.spawn()
        try:
            results = await asyncio.gather(*tasks)
        finally:
            stack.stop()
    for i, events in enumerate(results):
        audit = Audit.of(events, await full_answer(fake_process[1], MODEL, messages(i)))
        assert audit.seamless and audit.done, audit
        assert audit.attempts == {1, 2}  # the second generator continued the answer


# -- NATS restart --------------------------------------------------------------------------------


async def test_requests_published_before_a_nats_crash_are_served_after_it(
    tmp_path: Path, fake_process: tuple[FakeProcess, str], logs: Path
) -> None:
    config = tmp_path / "nats.conf"
    config.write_text("jetstream { sync_interval: always }\n")
    server = await NatsServer(tmp_path / "nats", config_file=config, auth=True, anonymous="admin").astart()
    stack = Stack(fault_settings(server.url, fake_process[1], **own(server)), logs)
    ids = [uuid.uuid4().hex for _ in range(5)]
    try:
        async with Edge(stack.settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            for request_id in ids:  # accepted (persisted) while no generator runs
                body = {"model": MODEL, "messages": messages(0), "stream": "deferred"}
                response = await http.post("/v1/chat", json=body, headers={"Idempotency-Key": request_id})
                assert response.status_code == 202
            server.kill()  # SIGKILL: no chance to flush anything
            server = await NatsServer(
                server.store_dir, server.port, config_file=config, auth=True, anonymous="admin"
            ).astart()
            nc = await nats.connect(server.url)
            try:
                queued = (await nc.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages
                assert queued == len(ids)
                subs = [await nc.subscribe(subjects.event_subject(i)) for i in ids]
                stack.spawn()
                answer = await full_answer(fake_process[1], MODEL, messages(0))
                for sub in subs:
                    events: list[dict[str, Any]] = []
                    async with asyncio.timeout(30):
                        while not events or events[-1]["type"] not in ("done", "error"):
                            events.append(msgspec.json.decode((await sub.next_msg(30)).data))
                    assert Audit.of(events, answer).done
                # The edge reconnected on its own: a new request through it works.
                async with asyncio.timeout(30):
                    while True:
                        with contextlib.suppress(httpx.HTTPError):
                            events = await stream_chat(http, 1)
                            if events[-1]["type"] == "done":
                                break
                        await asyncio.sleep(0.2)
            finally:
                await nc.close()
    finally:
        stack.stop()
        await server.astop()


# -- a node of a 3-node cluster killed under load ------------------------------------------------


async def test_killing_a_cluster_node_under_load_ends_every_accepted_request_once(
    tmp_path: Path, fake_process: tuple[FakeProcess, str], logs: Path
) -> None:
    cluster = await NatsCluster(tmp_path / "cluster").astart()
    try:
        await cluster.wait_ready()
        credentials = str(cluster.credentials_file)
        stack = Stack(
            fault_settings(cluster.url, fake_process[1], stream_replicas=3, nats_credentials=credentials),
            logs,
        )
        nc = await nats.connect(cluster.url.split(","))
        await bus.provision(nc.jetstream(timeout=10), stack.settings)  # once, not by each process at once
        stack.spawn()
        stack.spawn()
        await stack.ready(2)
        async with Edge(stack.settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=120) as http:
            requests = 24

            async def one(i: int) -> list[dict[str, Any]]:
                await asyncio.sleep(i * 0.05)
                return await stream_chat(http, i)

            load = [asyncio.create_task(one(i)) for i in range(requests)]
            await asyncio.sleep(1.0)
            info = await nc.jetstream().stream_info(subjects.EVENT_STREAM)
            leader = info.cluster.leader if info.cluster else None
            await nc.close()
            killed_at = time.monotonic()
            cluster.node(leader or "n1").kill()  # the leader of the event stream: the hardest node to lose
            results = await asyncio.gather(*load)
            finished_in = time.monotonic() - killed_at
            stack.stop()
        answers = await asyncio.gather(
            *(full_answer(fake_process[1], MODEL, messages(i)) for i in range(requests))
        )
        accepted = [i for i, events in enumerate(results) if events[0]["type"] != "refused"]
        audits = [Audit.of(results[i], answers[i]) for i in accepted]
        refused = requests - len(accepted)
        line = report(
            f"cluster (killed {leader}; {refused} refused with 503; {finished_in:.1f}s)", stack, audits
        )
        assert len(accepted) >= requests // 2, line
        assert all(a.terminals == 1 for a in audits), line
    finally:
        await cluster.astop()
