"""LiteLLM's proxy as a contender: its own virtual environment, configured for the same upstream.

The virtual environment lives under the cache directory and is created on first use, so the
project never depends on LiteLLM and a second run starts at once.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

from scripts.bench.procs import Proc

PACKAGE = "litellm[proxy]"


def ensure_venv(cache_dir: Path) -> Path:
    """Returns the `litellm` executable, installing it into `cache_dir/litellm-venv` if needed."""
    venv = cache_dir / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"installing {PACKAGE} into {venv} (first run only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with (cache_dir / "litellm-install.log").open("wb") as log:
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", PACKAGE],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return exe


def config_yaml(model: str, upstream: str) -> str:
    # `ollama_chat/` is LiteLLM's provider for Ollama's native `/api/chat`, the same endpoint
    # llmbus's generator calls.
    return f"""\
model_list:
  - model_name: "{model}"
    litellm_params:
      model: "ollama_chat/{model}"
      api_base: "{upstream}"
litellm_settings:
  telemetry: false
  drop_params: true
  request_timeout: 600
"""


# A deployment sets a master key (LiteLLM refuses to start without one); clients send it as a bearer.
MASTER_KEY = "sk-bench-" + secrets.token_hex(16)


def proxy(exe: Path, work_dir: Path, *, model: str, upstream: str, port: int, workers: int) -> Proc:
    config = work_dir / "litellm.yaml"
    config.write_text(config_yaml(model, upstream))
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # loopback only: no download of the price list
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
        "LITELLM_MASTER_KEY": MASTER_KEY,
    }
    args = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--num_workers", str(workers)]
    return Proc("litellm", args, work_dir, env=env)
