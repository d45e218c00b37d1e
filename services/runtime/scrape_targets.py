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


def targets(settings: Settings, roles: list[str]) -> dict[str, str]:
    """`role -> host:port` of every metrics endpoint among `roles`."""
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    out = {}
    for role in roles:
        if role == "edge":
            out[role] = f"{host}:{settings.http_port}"
        elif role in ROLE_OFFSETS and settings.metrics_port:
            out[role] = f"{host}:{port_for(role, settings.metrics_port)}"
    return out


def write_file_sd(path: Path, found: dict[str, str]) -> None:
    """One target group per role, labelled `service`, written atomically (Prometheus re-reads it)."""
    groups = [
        {"targets": [address], "labels": {"service": f"llmbus-{role}"}} for role, address in found.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(groups, indent=2) + "\n")
    partial.replace(path)
