"""What one hop costs on this machine: the floor under llmbus's added latency.

Round trips between two Python processes (uvloop), each a process of its own, one at a time with a
short pause between them (as a request of one stream meets an idle gateway):

- `socket`: a TCP echo on loopback, the cost of waking a Python process and a system call each way;
- `nats-server, raw protocol`: the same through nats-server, with a minimal protocol client (no
  nats-py), the server's own cost;
- `nats-py request`: nats-py's request/reply through the same server, a core NATS hop as llmbus's
  events travel (`llm.out.<id>`);
- `JetStream publish -> pull`: `js.publish` onto a file-backed stream, taken by a pull consumer with
  16 waiting fetches (as `services/runtime/worker.py` does), answered by a core publish: the request
  hop of llmbus (edge -> generator) plus one event hop back.

    python -m scripts.bench.floor            # --round-trips 1000 --pause-ms 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from services.runtime.nats_server import NatsServer, free_port

STREAM, SUBJECT, CONSUMER = "FLOOR", "floor.req", "floor"


# ---------------------------------------------------------------------------- the echo side


class _RawNats(asyncio.Protocol):
    """Just enough of the NATS protocol to subscribe, publish and read MSG frames."""

    def __init__(self, subscribe: str, on_msg: object) -> None:
        self.subscribe, self.on_msg, self.buffer = subscribe, on_msg, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(
            b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB %s 1\r\n' % self.subscribe.encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n")) >= 0:
            line = self.buffer[:end]
            if line.startswith(b"MSG "):
                size = int(line.rsplit(b" ", 1)[1])
                if len(self.buffer) < end + 2 + size + 2:
                    return
                payload = self.buffer[end + 2 : end + 2 + size]
                self.buffer = self.buffer[end + 2 + size + 2 :]
                self.on_msg(self, payload)  # type: ignore[operator]
                continue
            self.buffer = self.buffer[end + 2 :]
            if line == b"PING":
                self.transport.write(b"PONG\r\n")

    def publish(self, subject: bytes, payload: bytes) -> None:
        self.transport.write(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))


async def serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "socket":

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)

        server = await asyncio.start_server(echo, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()
    url = f"nats://127.0.0.1:{port}"
    if kind == "raw":
        await loop.create_connection(
            lambda: _RawNats("floor.ping", lambda p, data: p.publish(b"floor.pong", data)), "127.0.0.1", port
        )
        await asyncio.sleep(0.2)  # the server has the subscription
    elif kind == "nats-py":
        nc = await nats.connect(url)

        async def reply(msg: Msg) -> None:
            await nc.publish(msg.reply, msg.data)

        await nc.subscribe("floor.ping", cb=reply)
        await nc.flush()  # the server has the subscription
    elif kind == "jetstream":
        nc = await nats.connect(url)
        pull = await nc.jetstream().pull_subscribe_bind(CONSUMER, STREAM)

        async def slot() -> None:
            while True:
                with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                    for msg in await pull.fetch(1, timeout=5):
                        await nc.publish("floor.pong", msg.data)
                        await msg.ack()

        print("ready", flush=True)
        await asyncio.gather(*(slot() for _ in range(16)))
    print("ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------- the measuring side


async def _round_trips(kind: str, port: int, count: int, pause: float) -> list[float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    if kind == "socket":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            start = time.perf_counter()
            writer.write(b"x" * 64)
            await reader.read(1024)
            times.append(time.perf_counter() - start)
            await asyncio.sleep(pause)
        writer.close()
        return times
    if kind == "raw":
        waiter: asyncio.Future[None] = loop.create_future()

        def answered(_: _RawNats, __: bytes) -> None:
            if not waiter.done():
                waiter.set_result(None)

        transport, proto = await loop.create_connection(
            lambda: _RawNats("floor.pong", answered), "127.0.0.1", port
        )
        await asyncio.sleep(0.2)  # the SUB reaches the server
        for _ in range(count):
            waiter = loop.create_future()
            start = time.perf_counter()
            proto.publish(b"floor.ping", b"x" * 64)
            await waiter
            times.append(time.perf_counter() - start)
            await asyncio.sleep(pause)
        transport.close()
        return times
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        if kind == "nats-py":
            for _ in range(count):
                start = time.perf_counter()
                await nc.request("floor.ping", b"x" * 64, timeout=5)
                times.append(time.perf_counter() - start)
                await asyncio.sleep(pause)
            return times
        back: asyncio.Queue[float] = asyncio.Queue()

        async def pong(_: Msg) -> None:
            back.put_nowait(time.perf_counter())

        await nc.subscribe("floor.pong", cb=pong)
        js = nc.jetstream()
        for _ in range(count):
            start = time.perf_counter()
            await js.publish(SUBJECT, b"x" * 64)
            times.append(await asyncio.wait_for(back.get(), 5) - start)
            await asyncio.sleep(pause)
        return times
    finally:
        await nc.close()


async def _setup_stream(port: int) -> None:
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE))
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT))
    await nc.close()


KINDS = {
    "socket": "socket: Python <-> Python, TCP loopback",
    "raw": "nats-server, raw protocol",
    "nats-py": "nats-py request (core NATS)",
    "jetstream": "JetStream publish -> pull -> core reply",
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--pause-ms", type=float, default=3.0, help="between round trips (default 3)")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.serve:
        uvloop.run(serve(a.serve, a.port))
        return 0
    print(f"python -m scripts.bench.floor --round-trips {a.round_trips} --pause-ms {a.pause_ms:g}")
    print("| hop | round trips | p50 µs | p90 µs | p99 µs | one way p50 µs |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            uvloop.run(_setup_stream(server.port))
            for kind, label in KINDS.items():
                port = free_port() if kind == "socket" else server.port
                echo = subprocess.Popen(
                    [sys.executable, "-m", "scripts.bench.floor", "--serve", kind, "--port", str(port)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                try:
                    assert echo.stdout is not None
                    if echo.stdout.readline().strip() != "ready":  # up and subscribed
                        raise SystemExit(f"the {kind} echo process did not start")
                    warm = max(a.round_trips // 10, 10)
                    times = uvloop.run(_round_trips(kind, port, a.round_trips + warm, a.pause_ms / 1000))
                    del times[:warm]  # connections, first-call paths
                finally:
                    echo.terminate()
                    echo.wait()
                p50, p90, p99 = (_pct(times, q) for q in (50, 90, 99))
                print(f"| {label} | {len(times)} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {p50 / 2:.0f} |")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
