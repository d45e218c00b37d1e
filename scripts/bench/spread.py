"""The figures that judge the gateway, per level and contender, over every run of that level
(`--runs`): the median and the range, so one lucky run is not taken for a result."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol


class _Row(Protocol):
    contender: str
    level: Any  # scripts.bench.load.LevelResult
    cpu_s: float
    client_cpu_s: float
    parts_cpu_s: dict[str, float]
    added_p50_ms: float
    added_p99_ms: float


def _spread(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    median = f"{statistics.median(values):.{digits}f}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def table(rows: Sequence[_Row]) -> str:
    """One line per level and gateway: added TTFT, tokens/s as a share of `direct` in the same
    run, and the gateway's CPU per request, split by process; median (min..max) over the runs.
    The `direct` line's CPU is the upstream server's own, and every line has the load client's:
    with the gateway's they share the machine's cores."""
    direct_tps: dict[int, list[float]] = defaultdict(list)
    runs: dict[tuple[int, str], list[tuple[_Row, float]]] = defaultdict(list)
    for row in rows:
        lv = row.level
        tps = lv.tokens / lv.wall_s
        if row.contender == "direct":
            direct_tps[lv.concurrency].append(tps)
            runs[(lv.concurrency, row.contender)].append((row, 100.0))
        else:  # each run's tokens/s against the direct run just before it
            share = 100 * tps / direct_tps[lv.concurrency][-1] if direct_tps[lv.concurrency] else float("nan")
            runs[(lv.concurrency, row.contender)].append((row, share))
    head = (
        "| streams | gateway | runs | added TTFT p50 ms | added TTFT p99 ms | tokens/s % of direct "
        "| CPU per request ms | by process (ms per request) | load client CPU per request ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (streams, name), measured in runs.items():
        # The direct row's CPU is the upstream's own (no gateway): the floor for one HTTP hop.
        per_request = [
            1000 * (r.cpu_s or sum(r.parts_cpu_s.values())) / max(1, r.level.requests - r.level.errors)
            for r, _ in measured
        ]
        parts: dict[str, list[float]] = defaultdict(list)
        for r, _ in measured:
            for part, cpu in r.parts_cpu_s.items():
                parts[part].append(1000 * cpu / max(1, r.level.requests - r.level.errors))
        split = ", ".join(f"{part} {statistics.median(v):.2f}" for part, v in parts.items())
        cells = [
            str(streams),
            "direct (upstream alone)" if name == "direct" else name,
            str(len(measured)),
            _spread([r.added_p50_ms for r, _ in measured]),
            _spread([r.added_p99_ms for r, _ in measured]),
            _spread([share for _, share in measured], 1),
            _spread(per_request),
            split or "—",
            _spread([1000 * r.client_cpu_s / max(1, r.level.requests) for r, _ in measured]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
