"""The janitor's own metrics, in its own registry (`services.runtime.metrics.JANITOR`).

Served on `LLMBUS_METRICS_PORT` + the janitor's offset. What is loaded and the host's memory are
read at scrape time from the janitor's state (its last `/api/ps`), never polled in between.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.janitor.policy import read_host_memory
from services.runtime.metrics import JANITOR, janitor_server, port_for


class _Loaded(Protocol):
    size: int
    size_vram: int


class Janitor(Protocol):
    """What the gauges read of the janitor (a protocol: this module must not import janitor.py,
    which imports it)."""

    host: str

    @property
    def running(self) -> Mapping[str, _Loaded]: ...


UNLOADS = Counter(
    "llmbus_janitor_unloads",
    "Models the janitor unloaded, by reason (idle, memory_budget, host_memory, admin, ...)",
    ["reason"],
    registry=JANITOR,
)
OPERATIONS = Counter(
    "llmbus_janitor_operations",
    "Pulls and creates the janitor ran, by op (pull or create) and result (ok or error)",
    ["op", "result"],
    registry=JANITOR,
)
RECONCILE = Histogram(
    "llmbus_janitor_reconcile_duration_seconds",
    "One reconcile of models.toml against the model server (pulls and creates it waited for included)",
    buckets=(0.01, 0.05, 0.25, 1, 5, 30, 120, 600, 1800),
    registry=JANITOR,
)


class _State(Collector):
    """Models loaded, their memory, and the host's memory: read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.janitor: weakref.ref[Janitor] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        janitor = self.janitor() if self.janitor is not None else None
        if janitor is None:
            return
        host = janitor.host
        loaded = GaugeMetricFamily(
            "llmbus_janitor_models_loaded", "Models loaded on the host", labels=["host"]
        )
        loaded.add_metric([host], len(janitor.running))
        size = GaugeMetricFamily(
            "llmbus_janitor_loaded_bytes",
            "Memory the loaded models take on the host, in all (total) and in GPU memory (vram)",
            labels=["host", "memory"],
        )
        size.add_metric([host, "total"], sum(run.size for run in janitor.running.values()))
        size.add_metric([host, "vram"], sum(run.size_vram for run in janitor.running.values()))
        yield from (loaded, size)
        memory = read_host_memory()
        if memory is not None:
            family = GaugeMetricFamily(
                "llmbus_janitor_host_memory_bytes", "This machine's memory (/proc/meminfo)", labels=["state"]
            )
            family.add_metric(["total"], memory.total)
            family.add_metric(["used"], memory.used)
            yield family


_state = _State()
JANITOR.register(_state)


def serve(janitor: Janitor, host: str, base_port: int) -> None:
    """Exports `janitor`'s state and, if `base_port`, serves the registry on the janitor's port."""
    _state.janitor = weakref.ref(janitor)
    if base_port:
        janitor_server.acquire(host, port_for("janitor", base_port))


def stop() -> None:
    _state.janitor = None
    janitor_server.release()
