"""`python -m scripts.bench --quick` runs end to end and prints its table (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, exit_code: int = 0) -> subprocess.CompletedProcess[str]:
    """Runs `python -m module args` from the repository and checks how it exited."""
    run = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == exit_code, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _first_table(out: str) -> list[str]:
    """The rows of the first table printed (the per-run table), without its header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| streams | contender |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def test_quick_benchmark_without_litellm_exits_0_and_prints_one_row_per_contender_and_level() -> None:
    args = ["--quick", "--no-litellm", "--concurrency", "1,2", "--requests", "3", "--rounds", "1"]
    args += ["--tokens", "3", "--idle-streams", "5", "--ceiling-requests", "2", "--ceiling-tokens", "20"]
    args += ["--edge", "granian=scripts.bench.edge_granian"]  # an alternative edge, in the same run
    out = _run("scripts.bench", *args).stdout
    assert "| streams | contender | requests | errors | TTFT p50 ms |" in out
    rows = _first_table(out)
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        ("1", "direct"),
        ("1", "llmbus"),
        ("1", "llmbus-granian"),
        ("2", "direct"),
        ("2", "llmbus"),
        ("2", "llmbus-granian"),
    ]
    assert all(r.split("|")[4].strip() == "0" for r in rows)  # no errors column entry is non-zero
    assert "5/5 open on one edge" in out
    assert "llmbus:" in out and "llmbus-granian:" in out and "tokens/s relayed" in out
    # The gateways' figures per level, with CPU per request split by process.
    assert "| streams | gateway | runs | added TTFT p50 ms |" in out
    assert (
        "edge " in out.split("| streams | gateway |")[1] and "nats " in out.split("| streams | gateway |")[1]
    )


def test_repeated_runs_with_two_edges_and_two_generators_print_the_spread() -> None:
    args = [
        "--quick",
        "--no-litellm",
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--rounds",
        "1",
        "--runs",
        "2",
    ]
    args += [
        "--tokens",
        "3",
        "--idle-streams",
        "0",
        "--ceiling-requests",
        "0",
        "--edges",
        "2",
        "--generators",
        "2",
    ]
    out = _run("scripts.bench", *args).stdout
    assert [r.split("|")[2].strip() for r in _first_table(out)] == ["direct", "llmbus"] * 2
    direct, spread = out.split("| streams | gateway |")[1].splitlines()[2:4]
    # The upstream alone: its own CPU per request, the floor of one HTTP hop, and the load client's.
    cells = [c.strip() for c in direct.split("|")]
    assert cells[2] == "direct (upstream alone)" and cells[8].startswith("upstream ") and cells[9] != "—"
    cells = [c.strip() for c in spread.split("|")]
    assert cells[2] == "llmbus" and cells[3] == "2"  # two runs
    assert "edge " in cells[8] and "generator " in cells[8] and cells[9] != "—"


def test_quick_benchmark_with_the_ledger_reports_its_row_lag() -> None:
    args = ["--quick", "--no-litellm", "--concurrency", "2", "--requests", "4", "--rounds", "1"]
    args += ["--tokens", "3", "--idle-streams", "0", "--ceiling-requests", "0", "--ledger"]
    out = _run("scripts.bench", *args).stdout
    rows = _first_table(out)
    assert [r.split("|")[2].strip() for r in rows] == ["direct", "llmbus", "llmbus-ledger"]
    assert all(r.split("|")[4].strip() == "0" for r in rows)
    assert "2 streams: 4 rows, lag p50 " in out


def test_a_run_with_errors_exits_non_zero_and_says_it_is_not_a_result() -> None:
    args = ["--quick", "--no-litellm", "--contenders", "direct", "--fail-upstream", "--concurrency", "1"]
    args += ["--requests", "2", "--rounds", "1", "--idle-streams", "0", "--ceiling-requests", "0"]
    run = _run("scripts.bench", *args, exit_code=1)
    assert "HTTP 500" in run.stdout  # the first errors are shown
    assert "FAILED" in run.stderr and "this run is not a result" in run.stderr


def test_hop_floor_measures_every_hop_kind() -> None:
    out = _run("scripts.bench.floor", "--round-trips", "20", "--pause-ms", "1").stdout
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row[1].strip().split(",")[0].split(":")[0] for row in rows] == [
        "socket",
        "nats-server",
        "nats-py request (core NATS)",
        "JetStream publish -> pull -> core reply",
    ]
    assert all(row[2].strip() == "20" and float(row[3]) > 0 for row in rows)  # round trips, p50 µs


def test_http_floor_prints_both_servers_cpu_per_request() -> None:
    out = _run("scripts.bench.http_floor", "--concurrency", "8", "--runs", "1", "--requests", "64").stdout
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    servers = [row.split("|")[2].strip() for row in rows]
    assert servers == ["raw ASGI on uvicorn", "Litestar Stream on uvicorn"]
    assert all(float(row.split("|")[3].split()[0]) > 0 for row in rows)  # ~60 ms of CPU each: seen
