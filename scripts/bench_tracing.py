"""What tracing costs: the same streamed requests through llmbus with tracing off and on, one run.

    python scripts/bench_tracing.py                 # about a minute
    python scripts/bench_tracing.py --levels 1,8,32 --rounds 10 --requests 100

It starts the fake Ollama at zero delay, a real OTLP receiver (the Rust collector of the `rotel`
wheel, exporting nowhere, counting what it receives) and two llmbus stacks side by side, each
with its own nats-server, generator and edge processes: one without any `OTEL_*` variable
(tracing off, the default), one exporting to the receiver (`OTEL_EXPORTER_OTLP_ENDPOINT`, OTLP
over HTTP, the SDK's batch processor). The stacks take turns, round by round, so drift on the
machine hits both alike. The load generator is the gateway benchmark's (`scripts/bench/load.py`):
streamed `/v1/chat` requests, time to first token and total time measured at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from scripts.bench.load import LlmbusSseParser, Target, percentile, run_level  # noqa: E402
from scripts.bench.procs import PYTHON, Group, Proc, free_port  # noqa: E402
from services.runtime.nats_server import NatsServer  # noqa: E402

MODEL = "llama3.2:1b"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "stream": True}


@dataclass
class Side:
    """One llmbus stack and everything measured through it."""

    name: str
    target: Target
    group: Group
    sent: int = 0  # every request of the run, warm-up included
    ttft: array[float] = field(default_factory=lambda: array("d"))
    total: array[float] = field(default_factory=lambda: array("d"))
    cpu_s: float = 0.0
    requests: int = 0
    errors: int = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,16", help="comma-separated concurrency levels")
    p.add_argument("--rounds", type=int, default=6, help="turns each stack takes per level")
    p.add_argument("--requests", type=int, default=150, help="requests per stack per round")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--keep", action="store_true", help="keep the work directory (process logs)")
    return p.parse_args()


def rotel_binary() -> Path:
    try:
        import rotel
    except ImportError:
        raise SystemExit("needs the OTLP receiver: pip install rotel (in the dev extra)") from None
    return Path(rotel.__file__).parent / "rotel-agent"


def receiver(work: Path) -> tuple[Proc, int]:
    http_port, grpc_port = free_port(), free_port()
    proc = Proc(
        "rotel",
        [
            str(rotel_binary()),
            "start",
            "--exporter=blackhole",
            "--debug-log=traces",
            "--debug-log-verbosity=basic",
            f"--otlp-http-endpoint=127.0.0.1:{http_port}",
            f"--otlp-grpc-endpoint=127.0.0.1:{grpc_port}",
            f"--pid-file={work / 'rotel.pid'}",
            f"--log-file={work / 'rotel-agent.log'}",
        ],
        work,
    )
    proc.start().wait_port(http_port)
    return proc, http_port


def spans_received(rotel: Proc) -> int:
    text = rotel.log_path.read_text(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # its log is coloured
    return sum(int(n) for n in re.findall(r"(?<![a-z_])spans=(\d+)", plain))


def stack(
    name: str, work: Path, upstream: str, otel: dict[str, str], *, procs: list[Proc], natses: list[NatsServer]
) -> Side:
    nats = NatsServer(work / f"nats-{name}").start()
    natses.append(nats)
    http_port = free_port()
    env = {
        "LLMBUS_NATS_URL": nats.url,
        "LLMBUS_OLLAMA_URL": upstream,
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_CONCURRENCY": "256",
        "LLMBUS_LOG_LEVEL": "warning",
        **otel,
    }
    generator = Proc(
        f"generator-{name}", [PYTHON, "-m", "services.cli", "generator"], work, env=env, cwd=ROOT
    )
    edge = Proc(f"edge-{name}", [PYTHON, "-m", "services.cli", "edge"], work, env=env, cwd=ROOT)
    procs += [generator.start(), edge.start()]
    edge.wait_port(http_port)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health/ready", timeout=2).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"stack {name} not ready:\n{edge.tail()}\n{generator.tail()}")
        time.sleep(0.1)
    return Side(name, Target(name, f"{url}/v1/chat", BODY, LlmbusSseParser), Group([edge, generator]))


async def turn(side: Side, concurrency: int, requests: int, tokens: int) -> None:
    before = side.group.usage().cpu_s
    result = await run_level(side.target, concurrency=concurrency, requests=requests, expect_tokens=tokens)
    side.cpu_s += side.group.usage().cpu_s - before
    side.ttft.extend(result.ttft)
    side.total.extend(result.total)
    side.requests += requests
    side.sent += requests
    side.errors += result.errors
    if result.errors:
        print(f"  {side.name}: {result.errors} errors, e.g. {result.error_samples[:2]}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def run(args: argparse.Namespace, off: Side, on: Side) -> list[str]:
    rows = []
    for side in (off, on):  # warm-up: imports, connections, first-call paths
        await turn(side, 4, 40, args.tokens)
    for concurrency in (int(level) for level in args.levels.split(",")):
        for side in (off, on):
            side.ttft, side.total, side.cpu_s, side.requests, side.errors = array("d"), array("d"), 0.0, 0, 0
        for round_ in range(args.rounds):
            order = (off, on) if round_ % 2 == 0 else (on, off)
            for side in order:
                await turn(side, concurrency, args.requests, args.tokens)
        for side in (off, on):
            rows.append(
                f"| {concurrency} | {side.name} | {side.requests} | {side.errors} "
                f"| {ms(percentile(side.ttft, 50))} | {ms(percentile(side.ttft, 99))} "
                f"| {ms(percentile(side.total, 50))} | {ms(percentile(side.total, 99))} "
                f"| {side.cpu_s / max(side.requests, 1) * 1e6:.0f} |"
            )
        added = [
            percentile(on.ttft, 50) - percentile(off.ttft, 50),
            percentile(on.ttft, 99) - percentile(off.ttft, 99),
            percentile(on.total, 50) - percentile(off.total, 50),
            percentile(on.total, 99) - percentile(off.total, 99),
        ]
        cpu = (on.cpu_s / max(on.requests, 1) - off.cpu_s / max(off.requests, 1)) * 1e6
        rows.append(
            f"| {concurrency} | **added by tracing** | | | "
            + " | ".join(ms(a) for a in added)
            + f" | {cpu:.0f} |"
        )
        print(rows[-3], rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def main() -> int:
    args = parse_args()
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]  # "off" means what a user without any OTEL_* variable gets
    procs: list[Proc] = []
    natses: list[NatsServer] = []
    work = Path(tempfile.mkdtemp(prefix="llmbus-bench-tracing-"))
    command = "python scripts/bench_tracing.py " + " ".join(sys.argv[1:])
    print(f"{command}\nwork dir: {work}\ncpus: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    try:
        upstream_port = free_port()
        fake = Proc(
            "fake-ollama",
            [PYTHON, "-m", "tests.fakes.ollama", "--port", str(upstream_port), "--tokens", str(args.tokens)],
            work,
            cwd=ROOT,
        )
        procs.append(fake.start())
        fake.wait_port(upstream_port)
        upstream = f"http://127.0.0.1:{upstream_port}"
        rotel, otlp_port = receiver(work)
        procs.append(rotel)
        off = stack("off", work, upstream, {}, procs=procs, natses=natses)
        on = stack(
            "on",
            work,
            upstream,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            procs=procs,
            natses=natses,
        )
        print(
            "\n| concurrency | tracing | requests | errors | TTFT p50 ms | TTFT p99 ms | total p50 ms "
            "| total p99 ms | CPU µs/request (edge+generator) |\n|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        try:
            import uvloop

            uvloop.run(run(args, off, on))
        except ImportError:
            asyncio.run(run(args, off, on))
        for proc in procs[2:]:  # SIGTERM: the services flush their last batch of spans
            proc.stop()
        time.sleep(0.5)
        print(
            f"\nspans the receiver got: {spans_received(rotel)} for {on.sent} traced requests "
            "(4 each: HTTP, publish, consume, model call)"
        )
    except Exception:
        for proc in procs:
            print(f"--- {proc.name} ({proc.log_path}) ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            proc.stop()
        for nats in natses:
            nats.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
