"""Orchestration: start every contender on loopback, drive the same load through each, print one table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from scripts.bench import litellm, spread
from scripts.bench.ledger import Ledger, attach, print_lags
from scripts.bench.load import (
    LevelResult,
    LlmbusSseParser,
    NdjsonParser,
    OpenAISseParser,
    Target,
    client_for,
    percentile,
    run_level,
)
from scripts.bench.procs import PYTHON, Group, Proc, Usage, free_port
from services.runtime.nats_server import NatsServer

REPO = Path(__file__).resolve().parents[2]
MODEL = "llama3.2:1b"
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@dataclass
class Contender:
    name: str
    target: Target
    group: Group  # the gateway's processes (none for direct)
    parts: dict[str, Group] = field(default_factory=dict)  # the same, one by one, for the breakdown
    last_parts: dict[str, float] = field(default_factory=dict)  # CPU seconds of each in the last run
    ledger: bool = False  # runs with the ledger started (scripts/bench/ledger.py)


@dataclass
class Row:
    contender: str
    level: LevelResult
    cpu_s: float
    peak_rss_mb: float
    client_cpu_s: float
    parts_cpu_s: dict[str, float] = field(default_factory=dict)
    added_p50_ms: float = float("nan")
    added_p99_ms: float = float("nan")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    errors: int = 0


# ---------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description="Measure what llmbus adds to each streamed request, next to direct calls and LiteLLM.",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: small counts, seconds not minutes")
    p.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out (no virtualenv needed)")
    p.add_argument("--concurrency", help="comma-separated concurrent streams (default 1,16,64,256)")
    p.add_argument("--requests", type=int, help="at least this many requests per level (default 100)")
    p.add_argument("--rounds", type=int, help="and at least rounds x concurrency requests (default 4)")
    p.add_argument("--first-token-delay", type=float, help="upstream seconds before the first token (0.05)")
    p.add_argument("--token-interval", type=float, help="upstream seconds between tokens (0.02)")
    p.add_argument("--tokens", type=int, help="tokens per answer (16)")
    p.add_argument(
        "--burst",
        action="store_true",
        help="start every client at once (default: starts spread over one answer's duration, a steady load)",
    )
    p.add_argument("--idle-streams", type=int, help="streams held open on one edge; 0 skips (1000)")
    p.add_argument("--ceiling-tokens", type=int, help="tokens per answer in the zero-delay run (2000)")
    p.add_argument("--ceiling-requests", type=int, help="requests in the zero-delay run; 0 skips (32)")
    p.add_argument("--ceiling-concurrency", type=int, help="streams in the zero-delay run (8)")
    p.add_argument(
        "--litellm-workers", type=int, default=2, help="LiteLLM proxy worker processes (2: one per core here)"
    )
    p.add_argument("--contenders", help="comma-separated subset of direct,llmbus,litellm")
    p.add_argument(
        "--edge",
        action="append",
        default=[],
        metavar="NAME=MODULE",
        help="also measure llmbus with an edge started by `python -m MODULE` (same NATS and generator), "
        "as contender llmbus-NAME; repeatable, for A/B of edge changes in one run",
    )
    p.add_argument("--edges", type=int, default=1, help="llmbus edge processes sharing the port (1)")
    p.add_argument("--generators", type=int, default=1, help="llmbus generator processes (1)")
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure every level this many times, contenders alternating; prints each figure's spread",
    )
    p.add_argument(
        "--ledger",
        action="store_true",
        help="also measure llmbus with the ledger running (contender llmbus-ledger, started and stopped "
        "around its run at each level): latency with the ledger on vs off, and its row lag p50/p99",
    )
    p.add_argument(
        "--ledger-database", metavar="URL", help="the ledger's LLMBUS_DATABASE_URL (default: SQLite)"
    )
    p.add_argument("--cache-dir", type=Path, default=_cache_dir(), help="where LiteLLM's virtualenv lives")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (process logs)")
    p.add_argument(
        "--fail-upstream",
        action="store_true",
        help="the upstream answers 500 to everything: shows that a broken run exits non-zero",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="sample edge and generator with py-spy (pip install py-spy) into DIR/*.txt, collapsed stacks",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "concurrency": "1,4" if quick else "1,16,64,256",
        "requests": 8 if quick else 100,
        "rounds": 2 if quick else 4,
        "first_token_delay": 0.01 if quick else 0.05,
        "token_interval": 0.002 if quick else 0.02,
        "tokens": 4 if quick else 16,
        "idle_streams": 20 if quick else 1000,
        "ceiling_tokens": 100 if quick else 2000,
        "ceiling_requests": 4 if quick else 32,
        "ceiling_concurrency": 2 if quick else 8,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    names = ["direct", "llmbus"] + ([] if args.no_litellm else ["litellm"])
    if args.contenders:
        names = [n for n in names if n in args.contenders.split(",")]
    if "direct" not in names:
        names.insert(0, "direct")  # added latency is measured against it
    args.names = names
    return args


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmbus-bench"


# ---------------------------------------------------------------------------- the stack


class Stack:
    """Every process of the run; stopped in reverse order whatever happens."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[Proc] = []
        self.nats: NatsServer | None = None
        self.contenders: dict[str, Contender] = {}
        self.edge_group = Group([])
        self.generator_group = Group([])

    def _start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc.start()

    def up(self) -> None:
        a = self.args
        fake_port = free_port()
        fake = self._start(
            Proc(
                "fake-ollama",
                [
                    *(PYTHON, "-m", "tests.fakes.ollama", "--port", str(fake_port)),
                    *("--first-token-delay", str(a.first_token_delay)),
                    *("--token-interval", str(a.token_interval), "--tokens", str(a.tokens)),
                ],
                self.work,
                cwd=REPO,
            )
        )
        fake.wait_port(fake_port)
        self.upstream = f"http://127.0.0.1:{fake_port}"
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        self.contenders["direct"] = Contender(
            "direct",
            Target("direct", f"{self.upstream}/api/chat", body, NdjsonParser),
            Group([]),
            # The upstream's own CPU per request: what one Python HTTP hop streaming the same tokens
            # costs with no framework at all (a raw ASGI app on uvicorn), the floor under the edge's.
            parts={"upstream": Group([fake])},
        )
        if "llmbus" in a.names:
            self._llmbus(body)
        if "litellm" in a.names:
            self._litellm(body)

    def _llmbus(self, body: dict[str, Any]) -> None:
        a = self.args
        self.nats = NatsServer(self.work / "nats").start()
        http_port = free_port()
        env = {
            "LLMBUS_NATS_URL": self.nats.url,
            "LLMBUS_OLLAMA_URL": self.upstream,
            "LLMBUS_HTTP_PORT": str(http_port),
            # As many requests in flight as the load offers: queueing is not what is measured here.
            "LLMBUS_CONCURRENCY": str(max([*a.levels, a.ceiling_concurrency]) + 8),
            # The backlog limit stays on (its check is part of every request's cost) but above
            # what the benchmark holds open, so it never answers 503 queue_full here.
            "LLMBUS_MAX_QUEUE": str(max([*a.levels, a.idle_streams]) * 2 + 64),
            "LLMBUS_LOG_LEVEL": "warning",
            "OTEL_SDK_DISABLED": "true",
        }
        # Several processes of a role as `llmbus up` runs them (LLMBUS_EDGE_WORKERS, LLMBUS_GENERATORS).
        env["LLMBUS_EDGE_WORKERS"] = str(a.edges)
        generators = [self._replica("generator", i, env) for i in range(a.generators)]
        edges = [self._replica("edge", i, env) for i in range(a.edges)]
        edges[0].wait_port(http_port)
        url = f"http://127.0.0.1:{http_port}"
        _wait_http(f"{url}/health/ready", [*edges, *generators])
        edge, generator = edges[0], generators[0]
        self.llmbus_env, self.llmbus_url, self.edge, self.generator = env, url, edge, generator
        self.edge_group = Group(edges)
        self.generator_group = Group(generators)
        if a.profile:
            a.profile.mkdir(parents=True, exist_ok=True)
            for proc in (*edges, *generators):
                self._start(_py_spy(proc, a.profile, self.work))
        self.contenders["llmbus"] = self._llmbus_contender("llmbus", url, edge, body)
        if a.ledger:
            self.ledger = Ledger(env, self.work, REPO, self.nats.url, url)
            with_ledger = self._llmbus_contender("llmbus-ledger", url, edge, body)
            with_ledger.ledger = True
            self.contenders["llmbus-ledger"] = with_ledger
        for alt in a.edge:
            name, _, module = alt.partition("=")
            port = free_port()
            alt_edge = self._start(
                Proc(
                    f"edge-{name}",
                    [PYTHON, "-m", module],
                    self.work,
                    env={**env, "LLMBUS_HTTP_PORT": str(port)},
                    cwd=REPO,
                )
            )
            alt_edge.wait_port(port)
            alt_url = f"http://127.0.0.1:{port}"
            _wait_http(f"{alt_url}/health/ready", [alt_edge, generator])
            if a.profile:
                self._start(_py_spy(alt_edge, a.profile, self.work))
            self.contenders[f"llmbus-{name}"] = self._llmbus_contender(
                f"llmbus-{name}", alt_url, alt_edge, body
            )

    def _replica(self, role: str, replica: int, env: dict[str, str]) -> Proc:
        name = role if replica == 0 else f"{role}-{replica + 1}"
        own = {**env, "LLMBUS_REPLICA": str(replica)}
        return self._start(Proc(name, [PYTHON, "-m", "services.cli", role], self.work, env=own, cwd=REPO))

    def _llmbus_contender(self, name: str, url: str, edge: Proc, body: dict[str, Any]) -> Contender:
        nats = [self.nats.proc.pid] if self.nats is not None and self.nats.proc else []
        edges = self.edge_group.procs if edge is self.edge else [edge]
        return Contender(
            name,
            Target(name, f"{url}/v1/chat", body, LlmbusSseParser),
            Group([*edges, *self.generator_group.procs], extra_pids=nats),
            parts={
                "edge": Group(edges),
                "generator": self.generator_group,
                "nats": Group([], extra_pids=nats),
            },
        )

    def respawn_generator(self, concurrency: int) -> None:
        """A generator process with another concurrency in place of the running one."""
        old = self.generator
        old.stop()
        self.procs.remove(old)
        env = {**self.llmbus_env, "LLMBUS_CONCURRENCY": str(concurrency)}
        new = self._start(
            Proc("generator", [PYTHON, "-m", "services.cli", "generator"], self.work, env=env, cwd=REPO)
        )
        groups = [self.generator_group] + [
            c.group for n, c in self.contenders.items() if n.startswith("llmbus")
        ]
        for group in groups:
            group.procs = [new if proc is old else proc for proc in group.procs]
        self.generator = new
        _wait_http(f"{self.llmbus_url}/health/ready", [self.edge, new])

    def _litellm(self, body: dict[str, Any]) -> None:
        a = self.args
        exe = litellm.ensure_venv(a.cache_dir)
        port = free_port()
        proc = self._start(
            litellm.proxy(
                exe, self.work, model=MODEL, upstream=self.upstream, port=port, workers=a.litellm_workers
            )
        )
        proc.wait_port(port, timeout=180)
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health/liveliness", [proc], timeout=180)
        self.contenders["litellm"] = Contender(
            "litellm",
            Target(
                "litellm",
                f"{url}/v1/chat/completions",
                body,
                OpenAISseParser,
                headers={"Authorization": f"Bearer {litellm.MASTER_KEY}"},
            ),
            Group([proc]),
        )

    def down(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.nats is not None:
            self.nats.stop()

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    def fake_config(self, **changes: Any) -> None:
        httpx.post(f"{self.upstream}/_fake/config", json=changes, timeout=10).raise_for_status()

    def fake_reset(self) -> None:
        httpx.post(f"{self.upstream}/_fake/reset", timeout=30).raise_for_status()


def _py_spy(proc: Proc, out: Path, work: Path) -> Proc:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    args = [exe, "record", "--format", "raw", "--rate", "250", "--subprocesses"]
    args += ["--output", str(out / f"{proc.name}.txt"), "--pid", str(proc.pid)]
    return Proc(f"py-spy-{proc.name}", args, work, stop_signal=signal.SIGINT)  # SIGINT: it writes, then exits


def _wait_http(url: str, procs: list[Proc], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout}s ({last})")


# ---------------------------------------------------------------------------- phases


def _client_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def measure(contender: Contender, **load: Any) -> tuple[LevelResult, Usage, Usage, float]:
    contender.group.reset_peak()
    before, client0 = contender.group.usage(), _client_cpu()
    parts0 = {name: group.usage().cpu_s for name, group in contender.parts.items()}
    # The load generator's own collector stays off while it measures: a full collection over its
    # heap paused every stream it times by up to ~150 ms (p99 of all contenders, direct included).
    gc.collect()
    gc.disable()
    try:
        result = await run_level(contender.target, **load)
    finally:
        gc.enable()
    after = contender.group.usage()
    contender.last_parts = {
        name: round(group.usage().cpu_s - parts0[name], 3) for name, group in contender.parts.items()
    }
    return result, before, after, _client_cpu() - client0


async def levels(stack: Stack, report: Report) -> None:
    a = stack.args
    if a.fail_upstream:
        stack.fake_config(fail_status=500, fail_times=10**9)
    for contender in stack.contenders.values():  # warm-up: connections, imports, first-call paths
        result = await run_level(contender.target, concurrency=4, requests=8, expect_tokens=a.tokens)
        if result.errors:  # counted: the run goes on, prints what it has, and exits non-zero
            report.errors += result.errors
            print(f"{contender.name} failed its warm-up: {result.error_samples}", flush=True)
    for concurrency in [level for _ in range(a.runs) for level in a.levels]:
        requests = max(a.requests, a.rounds * concurrency)
        direct: Row | None = None
        for contender in stack.contenders.values():
            if contender.ledger:
                proc = await stack.ledger.start(a.ledger_database)
                stack.procs.append(proc)
                attach(contender.group, contender.parts, proc)
            stack.check_alive()
            level, before, after, client_cpu = await measure(
                contender,
                concurrency=concurrency,
                requests=requests,
                expect_tokens=a.tokens,
                stagger=0.0 if a.burst else a.first_token_delay + (a.tokens - 1) * a.token_interval,
            )
            row = Row(
                contender.name,
                level,
                after.cpu_s - before.cpu_s,
                after.peak_rss_mb,
                client_cpu,
                parts_cpu_s=contender.last_parts,
            )
            if direct is None:
                direct = row
            else:
                row.added_p50_ms = _ms(percentile(level.ttft, 50) - percentile(direct.level.ttft, 50))
                row.added_p99_ms = _ms(percentile(level.ttft, 99) - percentile(direct.level.ttft, 99))
            report.rows.append(row)
            report.errors += level.errors
            print(_progress(row), flush=True)
            if contender.ledger:
                lag = await stack.ledger.lag(level.requests)
                await stack.ledger.stop()
                stack.procs.remove(proc)
                report.extra.setdefault("ledger", {})[str(concurrency)] = lag
                print(f"c={concurrency:<4} ledger: {lag}", flush=True)


async def idle_streams(stack: Stack, report: Report) -> None:
    """Hold many streams open on one edge (a token a second each); memory per open stream."""
    n = stack.args.idle_streams
    contender = stack.contenders["llmbus"]
    stack.respawn_generator(n + 8)  # every stream's generation running, none queued
    stack.fake_config(first_token_delay=0.0, token_interval=1.0, tokens=600)
    edge_before, gen_before = stack.edge_group.usage(), stack.generator_group.usage()
    started = 0
    all_started = asyncio.Event()
    failures: list[str] = []

    async def hold(client: httpx.AsyncClient) -> None:
        nonlocal started
        target = contender.target
        try:
            async with client, client.stream("POST", target.url, json=target.body) as response:
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}")
                    all_started.set()  # stop waiting: this run failed
                    return
                seen = False
                async for chunk in response.aiter_raw():
                    if not seen and b"event: start" in chunk:
                        seen = True
                        started += 1
                        if started == n:
                            all_started.set()
                    if b"event: error" in chunk or b"event: done" in chunk:
                        failures.append(f"stream ended early: {chunk[:200]!r}")
                        all_started.set()
                        return
        except httpx.HTTPError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            all_started.set()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(hold(client_for(1, 120))) for _ in range(n)]
    try:
        async with asyncio.timeout(120):
            await all_started.wait()
        open_s = time.perf_counter() - t0
        await asyncio.sleep(0.3 if stack.args.quick else 3)  # a few relayed tokens on every stream
    except TimeoutError:
        failures.append(f"only {started} of {n} streams started within 120 s")
        open_s = math.nan
    finally:
        edge_after, gen_after = stack.edge_group.usage(), stack.generator_group.usage()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Every hang-up cancels its generation; wait until the upstream has let go of them all.
    await _upstream_idle(stack)
    stack.fake_reset()
    report.extra["idle_streams"] = {
        "streams": n,
        "started": started,
        "seconds_to_open_all": round(open_s, 2),
        "edge_rss_mb_before": round(edge_before.rss_mb, 1),
        "edge_rss_mb_open": round(edge_after.rss_mb, 1),
        "edge_kb_per_stream": round((edge_after.rss_mb - edge_before.rss_mb) * 1024 / max(started, 1), 1),
        "generator_rss_mb_before": round(gen_before.rss_mb, 1),
        "generator_rss_mb_open": round(gen_after.rss_mb, 1),
        "failures": failures[:5],
    }
    report.errors += len(failures)
    print(f"idle streams: {report.extra['idle_streams']}", flush=True)


async def _upstream_idle(stack: Stack, patience: float = 60.0) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            calls = (await client.get(f"{stack.upstream}/_fake/calls")).json()
            if all(c.get("finished_at") is not None or c.get("disconnected") for c in calls):
                return
            await asyncio.sleep(0.5)


async def ceiling(stack: Stack, report: Report) -> None:
    """Upstream at zero delay: tokens/s one edge relays, and per CPU-second of the edge."""
    a = stack.args
    stack.fake_config(first_token_delay=0.0, token_interval=0.0, tokens=a.ceiling_tokens)
    out: dict[str, Any] = {"tokens_per_answer": a.ceiling_tokens, "concurrency": a.ceiling_concurrency}
    try:
        for contender in stack.contenders.values():
            if contender.ledger:  # the same edge as `llmbus`; the ledger is measured in the levels
                continue
            edge = contender.parts.get("edge", Group([]))
            e0, g0 = edge.usage(), stack.generator_group.usage()
            level, before, after, client_cpu = await measure(
                contender,
                concurrency=a.ceiling_concurrency,
                requests=a.ceiling_requests,
                expect_tokens=a.ceiling_tokens,
            )
            report.errors += level.errors
            e1, g1 = edge.usage(), stack.generator_group.usage()
            figures: dict[str, Any] = {
                "tokens_per_s": round(level.tokens / level.wall_s),
                "gateway_cpu_s": round(after.cpu_s - before.cpu_s, 2),
                "client_cpu_s": round(client_cpu, 2),
                "wall_s": round(level.wall_s, 2),
                "errors": level.errors,
                "error_samples": level.error_samples,
            }
            if "edge" in contender.parts:
                edge_cpu = e1.cpu_s - e0.cpu_s
                figures["edge_cpu_s"] = round(edge_cpu, 2)
                figures["generator_cpu_s"] = round(g1.cpu_s - g0.cpu_s, 2)
                figures["tokens_per_edge_cpu_s"] = round(level.tokens / edge_cpu) if edge_cpu else None
            out[contender.name] = figures
            print(f"ceiling {contender.name}: {figures}", flush=True)
    finally:
        stack.fake_reset()
    report.extra["ceiling"] = out


# ---------------------------------------------------------------------------- output


def _ms(seconds: float) -> float:
    return seconds * 1000


def _f(value: float, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _progress(row: Row) -> str:
    lv = row.level
    return (
        f"c={lv.concurrency:<4} {row.contender:<8} n={lv.requests} errors={lv.errors} "
        f"ttft p50={_f(_ms(percentile(lv.ttft, 50)), 2)} ms p99={_f(_ms(percentile(lv.ttft, 99)), 2)} ms "
        f"added p50={_f(row.added_p50_ms, 2)} p99={_f(row.added_p99_ms, 2)} "
        f"tok/s={lv.tokens / lv.wall_s:.0f} cpu={row.cpu_s:.2f}s {row.parts_cpu_s or ''}"
        + (f" first errors: {lv.error_samples}" if lv.errors else "")
    )


def stack_names(report: Report) -> list[str]:
    """The contenders in the order they ran."""
    return list(dict.fromkeys(row.contender for row in report.rows)) or list(report.extra.get("ceiling", {}))


def table(report: Report) -> str:
    head = (
        "| streams | contender | requests | errors | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms "
        "| gap p99 ms | total p50 ms | tokens/s | requests/s | gateway CPU s | gateway peak RSS MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in report.rows:
        lv = row.level
        direct = row.contender == "direct"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(lv.concurrency),
                    row.contender,
                    str(lv.requests),
                    str(lv.errors),
                    _f(_ms(percentile(lv.ttft, 50)), 2),
                    _f(_ms(percentile(lv.ttft, 99)), 2),
                    "—" if direct else _f(row.added_p50_ms, 2),
                    "—" if direct else _f(row.added_p99_ms, 2),
                    _f(_ms(percentile(lv.gaps, 99)), 2),
                    _f(_ms(percentile(lv.total, 50)), 1),
                    f"{lv.tokens / lv.wall_s:.0f}",
                    f"{(lv.requests - lv.errors) / lv.wall_s:.1f}",
                    "—" if direct else f"{row.cpu_s:.2f}",
                    "—" if direct else f"{row.peak_rss_mb:.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


class Neighbours:
    """What else ran during the run: average CPU of every process that is not this benchmark's."""

    def __init__(self) -> None:
        self._procs = {p.pid: p for p in psutil.process_iter(["cmdline"])}
        for proc in self._procs.values():
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(None)  # starts the measurement window

    def report(self, min_percent: float = 5.0) -> list[str]:
        me = psutil.Process()
        ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
        busy: list[tuple[float, str]] = []
        for pid, proc in self._procs.items():
            if pid in ours:
                continue
            with contextlib.suppress(psutil.Error):
                percent = proc.cpu_percent(None)
                if percent >= min_percent:
                    command = " ".join(proc.info["cmdline"] or [proc.name()])
                    busy.append((percent, command[:100]))
        return [f"{percent:.0f}% {command}" for percent, command in sorted(busy, reverse=True)[:8]]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def to_json(report: Report, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for row in report.rows:
        lv = row.level
        rows.append(
            {
                "contender": row.contender,
                "concurrency": lv.concurrency,
                "requests": lv.requests,
                "errors": lv.errors,
                "error_samples": lv.error_samples,
                "ttft_p50_ms": _ms(percentile(lv.ttft, 50)),
                "ttft_p99_ms": _ms(percentile(lv.ttft, 99)),
                "added_ttft_p50_ms": row.added_p50_ms,
                "added_ttft_p99_ms": row.added_p99_ms,
                "gap_p50_ms": _ms(percentile(lv.gaps, 50)),
                "gap_p99_ms": _ms(percentile(lv.gaps, 99)),
                "total_p50_ms": _ms(percentile(lv.total, 50)),
                "total_p99_ms": _ms(percentile(lv.total, 99)),
                "tokens_per_s": lv.tokens / lv.wall_s,
                "requests_per_s": (lv.requests - lv.errors) / lv.wall_s,
                "gateway_cpu_s": row.cpu_s,
                "gateway_peak_rss_mb": row.peak_rss_mb,
                "client_cpu_s": row.client_cpu_s,
                "gateway_cpu_s_by_process": row.parts_cpu_s,
                "wall_s": lv.wall_s,
            }
        )
    settings = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool | list)}
    return {"settings": settings, "rows": rows, **report.extra}


# ---------------------------------------------------------------------------- main


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llmbus-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


async def _run(stack: Stack, report: Report) -> None:
    if "llmbus" in stack.contenders and stack.args.idle_streams > 0:
        # First, on an edge whose heap the load levels have not grown yet (their freed memory
        # would hold the streams and hide what they cost), then back to the levels' generator.
        concurrency = int(stack.llmbus_env["LLMBUS_CONCURRENCY"])
        target = stack.contenders["llmbus"].target  # the edge imports what a request needs
        warm = await run_level(target, concurrency=2, requests=4, expect_tokens=stack.args.tokens)
        report.errors += warm.errors
        await idle_streams(stack, report)
        stack.respawn_generator(concurrency)
    await levels(stack, report)
    if stack.args.ceiling_requests > 0:
        await ceiling(stack, report)


def print_results(report: Report, args: argparse.Namespace) -> None:
    """The tables and every phase's figures, after the run."""
    print()
    print(
        f"upstream: first token after {args.first_token_delay * 1000:g} ms, then a token every "
        f"{args.token_interval * 1000:g} ms, {args.tokens} tokens per answer"
    )
    print(table(report))
    print()
    print(spread.table(report.rows))
    if "idle_streams" in report.extra:
        idle = report.extra["idle_streams"]
        print(
            f"\nidle streams: {idle['started']}/{idle['streams']} open on one edge in "
            f"{idle['seconds_to_open_all']} s; edge RSS {idle['edge_rss_mb_before']} -> "
            f"{idle['edge_rss_mb_open']} MB = {idle['edge_kb_per_stream']} KB per open stream"
        )
    if "ceiling" in report.extra:
        c = report.extra["ceiling"]
        print(f"\nzero-delay upstream, {c['concurrency']} streams of {c['tokens_per_answer']} tokens:")
        for name in stack_names(report):
            if name in c:
                fig = c[name]
                extra = ""
                if "edge_cpu_s" in fig:
                    extra = (
                        f", edge CPU {fig['edge_cpu_s']} s / generator CPU {fig['generator_cpu_s']} s "
                        f"over {fig['wall_s']} s = {fig['tokens_per_edge_cpu_s']} tokens per edge CPU-second"
                    )
                print(f"  {name}: {fig['tokens_per_s']} tokens/s relayed{extra}")
    if "ledger" in report.extra:
        print_lags(report.extra["ledger"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()
    report.extra["machine"] = machine()
    report.extra["load_average_before"] = os.getloadavg()
    command = "python -m scripts.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\nmachine: {report.extra['machine']}\nload average: {os.getloadavg()}", flush=True)
    neighbours = Neighbours()
    with work_dir(args.keep) as work:
        stack = Stack(args, work)
        try:
            stack.up()
            try:
                import uvloop
            except ImportError:
                asyncio.run(_run(stack, report))
            else:
                uvloop.run(_run(stack, report))
        except Exception:
            for proc in stack.procs:
                print(f"--- {proc.name} log ({proc.log_path}) ---\n{proc.tail()}", file=sys.stderr)
            raise
        finally:
            stack.down()
    report.extra["load_average_after"] = os.getloadavg()
    report.extra["other_processes"] = neighbours.report()
    print_results(report, args)
    before, after = report.extra["load_average_before"], report.extra["load_average_after"]
    print(f"\nload average before/after: {before} / {after}")
    print("other processes during the run (average CPU, 100% = one core):")
    for line in report.extra["other_processes"] or ["none above 5%"]:
        print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps(to_json(report, args), indent=2, default=str))
    if report.errors:
        print(f"\nFAILED: {report.errors} errors; this run is not a result", file=sys.stderr)
        return 1
    return 0
