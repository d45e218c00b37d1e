"""How right is the `queued` position? A burst of N streamed requests, submitted one after the other
(each once the edge has queued the one before), against one generator with one slot and a slow
fake Ollama: FIFO, so the true position of request i at time t is 1 + the requests before it that
have not started by t. Every `queued` event is checked against that truth at the moment the client
read it, and against the truth at any moment of the `STALE_S` before (a look may be that old).

    python -m tests.queue_burst [N] [--mixed]   (its own nats-server, fake Ollama, generator, edge)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import nats

from contracts import subjects
from services.generator.main import Generator
from services.runtime.nats_server import NatsServer, free_port
from services.runtime.queue_stats import FRESH_S
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeConfig, FakeOllama

MODEL = "llama3.2:1b"
STALE_S = FRESH_S + 0.25  # a shared look's age, plus the look's and the relay's own time


@dataclass
class Seen:
    queued: list[tuple[float, int, bool]] = field(default_factory=list)  # (read at, position, exact)
    started: float | None = None


@dataclass
class Result:
    requests: int
    events: int
    right: int  # equal to the truth when read
    right_recently: int  # equal to the truth at some moment of the STALE_S before it was read
    exact_flagged: int  # events that said `exact: true`
    first_right: int  # requests whose first `queued` event was right
    first_events: int

    def lines(self) -> list[str]:
        pct = 100 / max(self.events, 1)
        return [
            f"requests {self.requests}, queued events {self.events}",
            f"right when read: {self.right} ({self.right * pct:.1f} %)",
            f"right within the last {STALE_S:.2f} s: {self.right_recently} "
            f"({self.right_recently * pct:.1f} %)",
            f"flagged exact: {self.exact_flagged} ({self.exact_flagged * pct:.1f} %)",
            f"first event of each waiting request right: {self.first_right}/{self.first_events}",
        ]


def truth(index: int, at: float, seen: list[Seen]) -> int:
    return 1 + sum(1 for s in seen[:index] if s.started is None or s.started > at)


async def burst(
    http: httpx.AsyncClient, n: int, between: Callable[[], Awaitable[object]] | None
) -> list[Seen]:
    seen = [Seen() for _ in range(n)]

    async def read(index: int, response: httpx.Response) -> None:
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                now = time.monotonic()
                if kind == "queued":
                    data = json.loads(line[6:])
                    seen[index].queued.append((now, int(data["position"]), bool(data["exact"])))
                elif kind == "start" and seen[index].started is None:
                    seen[index].started = now

    async with contextlib.AsyncExitStack() as opened:
        readers = []
        for i in range(n):  # in a known order: each is queued before the next is sent
            if between is not None:
                await between()
            body = {"model": MODEL, "prompt": f"request {i}", "stream": True}
            response = await opened.enter_async_context(http.stream("POST", "/v1/generate", json=body))
            readers.append(asyncio.create_task(read(i, response)))
        await asyncio.gather(*readers)
    return seen


def score(seen: list[Seen]) -> Result:
    events = right = recently = exact = first_right = first_events = 0
    for index, s in enumerate(seen):
        for number, (at, position, flagged) in enumerate(s.queued):
            events += 1
            exact += flagged
            now_right = truth(index, at, seen) == position
            right += now_right
            # the truth changes only when a request starts: check the moments in the window
            moments = [at - STALE_S] + [
                x.started for x in seen[:index] if x.started and at - STALE_S < x.started < at
            ]
            recently += now_right or any(truth(index, m, seen) == position for m in moments)
            if number == 0:
                first_events += 1
                first_right += now_right
    return Result(len(seen), events, right, recently, exact, first_right, first_events)


async def measure(settings: Settings, n: int, *, mixed: bool = False) -> Result:
    """`mixed`: an embedding request (which no embedder takes) is queued before each one, so the
    stream holds other subjects' requests between this queue's: the position's bounds no longer
    meet, and it is counted by stepping through the queue."""
    settings = msgspec.structs.replace(settings, concurrency=1, request_timeout_s=600.0)
    gen = Generator(settings)
    await gen.start()
    nc = await nats.connect(settings.nats_url)  # the operator (the tests' anonymous admin)
    js = nc.jetstream()

    async def embed_request() -> object:
        return await js.publish(subjects.embed_subject("nomic-embed-text"), b"{}")

    try:
        async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=600) as http:
            return score(await burst(http, n, embed_request if mixed else None))
    finally:
        await nc.close()
        await gen.stop(grace=0)


async def main(n: int, mixed: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = FakeConfig(first_token_delay=1.0, token_interval=0.05, tokens=4)
        nats = await NatsServer(Path(tmp) / "nats", auth=True, anonymous="admin").astart()
        try:
            async with FakeOllama(config) as fake:
                settings = Settings(
                    nats_url=nats.url,
                    nats_credentials=str(nats.credentials_file),
                    ollama_url=fake.url,
                    http_port=free_port(),
                    data_dir=tmp,
                )
                result = await measure(settings, n, mixed=mixed)
        finally:
            await nats.astop()
    print("\n".join(result.lines()))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--mixed"]
    asyncio.run(main(int(args[0]) if args else 20, "--mixed" in sys.argv))
