"""Embedding throughput with and without micro-batching, and the cache-hit latency, in one run.

    python scripts/bench_embed.py                       # about two minutes
    python scripts/bench_embed.py --duration 20 --via nats --profiles 20:1.5

It starts nats-server, the fake Ollama as its own process (per-call and per-item embedding costs,
one embedding call at a time, as Ollama runs an embedding model), the edge, and then the embedder
twice: batching off, then on. 64 clients each embed one new sentence per request, back to back,
for `--duration` seconds per run, so every request is a cache miss. Then, with batching on, they
ask again for sentences already embedded: every request is a cache hit.

`--via nats` clients publish on `llm.req.embed.<model>` as another backend would (this measures the
embedder); `--via http` clients call `POST /v1/embed` on the edge (this adds the edge's own cost).
Each cost profile is `call_ms:item_ms`, the fake's `embed_call_cost` / `embed_item_cost`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import nats
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts import headers, subjects  # noqa: E402
from services.runtime.nats_server import NatsServer, free_port  # noqa: E402

MODEL = "nomic-embed-text"
# call-dominated: what one more HTTP call costs (JSON, scheduling, the runner round trip, setting
# up a forward pass) against one short sentence's share of a batch; item-heavy: where it stops.
PROFILES = ("20:1.5", "5:10")
WORDS = ("river", "stone", "light", "green", "signal", "cloud", "bridge", "garden", "orbit", "paper")
PY = sys.executable


@dataclass
class Run:
    name: str
    embeddings: int
    errors: int
    seconds: float
    latencies: list[float]
    backend_calls: int
    backend_inputs: int
    fewest: int  # requests the slowest client completed

    @property
    def throughput(self) -> float:
        return self.embeddings / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def sentence(run: str, client: int, n: int) -> str:
    pick = [WORDS[(client * 7 + n * 3 + i) % len(WORDS)] for i in range(6)]
    return f"{run} {client} {n} " + " ".join(pick)


class Client(Protocol):
    async def embed(self, text: str) -> bool:
        """True when the answer is one vector."""
        ...


class HttpClient:
    """A bare HTTP/1.1 keep-alive client, one connection per concurrent client.

    httpx costs a millisecond or more of CPU per request, which on a small machine would be taken
    from the edge and the embedder being measured.
    """

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port = host, port
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.connections = connections
        self.head = f"POST /v1/embed HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"

    async def start(self) -> None:
        for _ in range(self.connections):
            self.idle.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def close(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()

    async def embed(self, text: str) -> bool:
        body = json.dumps({"model": MODEL, "input": text}).encode()
        request = f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        reader, writer = await self.idle.get()
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                answer = json.loads(await reader.readexactly(length))
                break
            except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
                writer.close()
                reader, writer = await asyncio.open_connection(self.host, self.port)
                if attempt == 2:
                    self.idle.put_nowait((reader, writer))
                    return False
        self.idle.put_nowait((reader, writer))
        return head.startswith(b"HTTP/1.1 200") and len(answer["embeddings"]) == 1


class NatsClient:
    """Publishes like another backend: JetStream publish, events on `llm.out.<id>`."""

    def __init__(self, nc: NatsConnection) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subject = subjects.embed_subject(MODEL)
        self.waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        async def on_event(msg: Msg) -> None:  # one wildcard subscription for every request
            future = self.waiting.pop(msg.subject[len(subjects.EVENT_PREFIX) :], None)
            if future is not None and not future.done():
                future.set_result(msg.data)

        await self.nc.subscribe(subjects.EVENT_PREFIX + "*", cb=on_event)

    async def embed(self, text: str) -> bool:
        request_id = uuid.uuid4().hex
        future = self.waiting[request_id] = asyncio.get_running_loop().create_future()
        hdrs = {headers.MSG_ID: request_id, headers.REPLY: subjects.event_subject(request_id)}
        payload = json.dumps({"id": request_id, "model": MODEL, "input": text}).encode()
        await self.js.publish(self.subject, payload, headers=hdrs)
        event = json.loads(await asyncio.wait_for(future, 120))
        return event["type"] == "embeddings" and len(event["embeddings"]) == 1


@contextlib.asynccontextmanager
async def connect(via: str, target: str, clients: int) -> AsyncIterator[Client]:
    if via == "http":
        host, port = target.removeprefix("http://").split(":")
        http = HttpClient(host, int(port), clients)
        await http.start()
        try:
            yield http
        finally:
            await http.close()
    else:
        nc = await nats.connect(target)
        try:
            client = NatsClient(nc)
            await client.start()
            yield client
        finally:
            await nc.close()


async def load(client: Client, fake: str, name: str, *, clients: int, duration: float, cycle: int = 0) -> Run:
    """`clients` closed-loop clients, one single-sentence request each at a time, for `duration`.

    Sentences are unique per run `name`; with `cycle`, client c repeats its first `cycle` ones.
    """
    latencies: list[float] = []
    errors = 0
    completed = [0] * clients
    prefix = name.replace(" ", "-")
    async with httpx.AsyncClient(base_url=fake) as control:
        await control.post("/_fake/reset")
        deadline = time.perf_counter() + duration

        async def one(c: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                text = sentence(prefix, c, n % cycle if cycle else n)
                started = time.perf_counter()
                ok = await client.embed(text)
                elapsed = time.perf_counter() - started
                n += 1
                if ok:
                    latencies.append(elapsed)
                    completed[c] += 1
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        seconds = time.perf_counter() - started
        calls = [c for c in (await control.get("/_fake/calls")).json() if c["path"] == "/api/embed"]
    inputs = sum(len(c["body"]["input"]) for c in calls)
    return Run(name, len(latencies), errors, seconds, latencies, len(calls), inputs, min(completed))


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n" + "\n".join(tail))

    def wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port}")

    async def wait_service(self, nats_url: str, service: str) -> None:
        nc = await nats.connect(nats_url)
        try:
            for _ in range(300):
                self.check()
                with contextlib.suppress(Exception):
                    await nc.request(f"$SRV.PING.llmbus-{service}", b"", timeout=0.2)
                    return
                await asyncio.sleep(0.1)
            raise RuntimeError(f"{self.name} did not come up")
        finally:
            await nc.close()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def profile(args: argparse.Namespace, call_ms: float, item_ms: float, work: Path) -> list[Run]:
    """One cost profile: batching off, batching on, then cache hits, against the same stack."""
    nats_server = await NatsServer(work / f"nats-{call_ms}-{item_ms}").astart()
    fake_port, http_port = free_port(), free_port()
    fake_url, edge_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{http_port}"
    env = {
        "PYTHONPATH": str(ROOT),
        "LLMBUS_NATS_URL": nats_server.url,
        "LLMBUS_OLLAMA_URL": fake_url,
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_LOG_LEVEL": "warning",
        "LLMBUS_EMBED_MAX_BATCH": str(args.max_batch),
        "LLMBUS_EMBED_MAX_WAIT_MS": str(args.max_wait_ms),
    }
    fake_args = ["--port", str(fake_port), "--parallel", "1"]
    fake_args += ["--embed-call-cost", str(call_ms / 1000), "--embed-item-cost", str(item_ms / 1000)]
    clients, duration = args.clients, args.duration
    runs: list[Run] = []
    procs: list[Proc] = []
    try:
        procs.append(Proc("fake-ollama", [PY, "-m", "tests.fakes.ollama", *fake_args], env, work))
        procs[-1].wait_port(fake_port)
        if "http" in args.via:
            procs.append(Proc("edge", [PY, "-m", "services.cli", "edge"], env, work))
            procs[-1].wait_port(http_port)
        for batching in ("off", "on"):
            embedder = Proc(
                f"embedder-{batching}",
                [PY, "-m", "services.cli", "embedder"],
                {**env, "LLMBUS_EMBED_BATCHING": "true" if batching == "on" else "false"},
                work,
            )
            try:
                await embedder.wait_service(nats_server.url, "embedder")
                for via in args.via:
                    target = edge_url if via == "http" else nats_server.url
                    async with connect(via, target, clients) as client:
                        await load(client, fake_url, f"warm-up {batching} {via}", clients=8, duration=1.0)
                        name = f"{via}, batching {batching}"
                        runs.append(await load(client, fake_url, name, clients=clients, duration=duration))
                        if batching == "on":  # those sentences are cached now: ask for them again
                            cycle = max(1, runs[-1].fewest)
                            for hits, n in ((f"{via}, cache hits", clients), (f"{via}, hits, 1 client", 1)):
                                run = await load(
                                    client, fake_url, name, clients=n, duration=duration, cycle=cycle
                                )
                                run.name = hits
                                runs.append(run)
            finally:
                embedder.stop()
    finally:
        for proc in reversed(procs):
            proc.stop()
        await nats_server.astop()
    return runs


def report(call_ms: float, item_ms: float, runs: list[Run]) -> None:
    print(f"\nprofile: embed_call_cost {call_ms:g} ms, embed_item_cost {item_ms:g} ms, one call at a time")
    print(
        f"{'run':<26}{'embeddings/s':>14}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'calls':>8}{'inputs/call':>13}{'errors':>8}"
    )
    for run in sorted(runs, key=lambda run: run.name.split(",")[0]):
        per_call = f"{run.backend_inputs / run.backend_calls:.1f}" if run.backend_calls else "-"
        print(
            f"{run.name:<26}{run.throughput:>14.1f}{run.pct(0.5):>10.1f}{run.pct(0.99):>10.1f}"
            f"{run.backend_calls:>8}{per_call:>13}{run.errors:>8}"
        )
    by_name = {run.name: run for run in runs}
    for via in ("nats", "http"):
        off, on = by_name.get(f"{via}, batching off"), by_name.get(f"{via}, batching on")
        if off and on and off.throughput:
            print(f"{via}: batching on / off = {on.throughput / off.throughput:.1f}x throughput")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), help="call_ms:item_ms ...")
    parser.add_argument("--via", nargs="+", choices=("nats", "http"), default=["nats", "http"])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    print(
        f"{args.clients} clients, {args.duration:g} s per run, embedder max batch {args.max_batch}, "
        f"max wait {args.max_wait_ms:g} ms, cache on (misses: every sentence is new); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    with tempfile.TemporaryDirectory(prefix="llmbus-bench-embed-") as tmp:
        for spec in args.profiles:
            call_ms, item_ms = (float(part) for part in spec.split(":"))
            runs = await profile(args, call_ms, item_ms, Path(tmp))
            report(call_ms, item_ms, runs)


if __name__ == "__main__":
    asyncio.run(main())
