"""Where Prometheus finds every process `llmbus up` starts: one port per role, a file-SD file.

Workers serve `/metrics` on `LLMBUS_METRICS_PORT` + their role's offset (services/runtime/metrics.py
`port_for`), the edge on its HTTP port. `llmbus up` prints them and writes them in Prometheus'
file-based service discovery form to `<data dir>/prometheus/targets.json`; point a `file_sd_configs`
entry at it.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.runtime.metrics import ROLE_OFFSETS, port_for
from services.runtime.settings import Settings

DEFAULT_BASE_PORT = 9464  # OpenTelemetry's Prometheus exporter port: the usual first choice


def targets(settings: Settings, names: list[str]) -> dict[str, str]:
    """`name -> host:port` of every metrics endpoint among the processes `names` (`edge`,
    `generator-2`: a role and, after the first, its process's number)."""
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    out = {}
    for name in names:
        role, _, number = name.partition("-")
        replica = int(number) - 1 if number.isdigit() else 0
        if role == "edge" and settings.edge_workers <= 1:
            out[name] = f"{host}:{settings.http_port}"  # a lone edge serves /metrics on its HTTP port
        elif (role == "edge" or role in ROLE_OFFSETS) and settings.metrics_port:
            out[name] = f"{host}:{port_for(role, settings.metrics_port, replica)}"
    return out


def write_file_sd(path: Path, found: dict[str, str]) -> None:
    """One target group per role, labelled `service`, written atomically (Prometheus re-reads it)."""
    groups = [
        {"targets": [address], "labels": {"service": f"llmbus-{name.partition('-')[0]}", "process": name}}
        for name, address in found.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(groups, indent=2) + "\n")
    partial.replace(path)
