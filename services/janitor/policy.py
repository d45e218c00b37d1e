"""Which loaded models to unload, and why: a pure function of what is loaded and the clock.

Three rules, in order, never touching a pinned model:

1. idle: a model unused for longer than its idle TTL goes;
2. memory budget: while the loaded models together use more than the budget, the least recently
   used goes first;
3. host memory: while the host's memory use is above the threshold, the least recently used goes
   first (each unload is assumed to free the model's size).
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.models import UnloadReason


@dataclass(frozen=True)
class Loaded:
    model: str
    size: int  # bytes it holds in memory (RAM plus VRAM)
    last_used: float  # Unix seconds
    idle_ttl_s: float | None = None  # None: never idle-unloaded
    pinned: bool = False


@dataclass(frozen=True)
class HostMemory:
    total: int
    used: int

    @property
    def fraction(self) -> float:
        return self.used / self.total if self.total else 0.0


@dataclass(frozen=True)
class Unload:
    model: str
    reason: UnloadReason


def plan(
    loaded: list[Loaded],
    now: float,
    *,
    budget: int | None = None,
    host: HostMemory | None = None,
    host_threshold: float | None = None,
) -> list[Unload]:
    unloads: list[Unload] = []
    idle = {
        m.model
        for m in loaded
        if not m.pinned and m.idle_ttl_s is not None and now - m.last_used >= m.idle_ttl_s
    }
    unloads += [Unload(m.model, "idle") for m in loaded if m.model in idle]
    # Least recently used first; the name breaks ties so the plan is deterministic.
    candidates = sorted(
        (m for m in loaded if not m.pinned and m.model not in idle), key=lambda m: (m.last_used, m.model)
    )
    in_use = sum(m.size for m in loaded if m.model not in idle)
    if budget is not None:
        while in_use > budget and candidates:
            victim = candidates.pop(0)
            in_use -= victim.size
            unloads.append(Unload(victim.model, "memory_budget"))
    if host is not None and host_threshold is not None and host.total:
        freed = sum(m.size for m in loaded if m.model in {u.model for u in unloads})
        while (host.used - freed) / host.total > host_threshold and candidates:
            victim = candidates.pop(0)
            freed += victim.size
            unloads.append(Unload(victim.model, "host_memory"))
    return unloads


def read_host_memory(meminfo: str = "/proc/meminfo") -> HostMemory | None:
    """This machine's memory use from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open(meminfo) as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(":") == 1}
    except (OSError, ValueError, IndexError):
        return None
    total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    if not total or available is None:
        return None
    return HostMemory(total=total, used=total - available)
