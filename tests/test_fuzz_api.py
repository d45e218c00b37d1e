"""The HTTP API, fuzzed from its own OpenAPI document by schemathesis (scripts/fuzz_edge.py):
every generated request, valid or not, gets an answer that is not a 5xx, and none hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fuzz(max_examples: int, timeout: float) -> dict[str, object]:
    # Not the virtualenv's bin on PATH, as when it runs by the venv's python without activating it.
    bare = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    run = subprocess.run(
        [sys.executable, "scripts/fuzz_edge.py", "--max-examples", str(max_examples)],
        cwd=REPO,
        env={**os.environ, "PATH": bare},
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test
        check=False,
    )
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    return result


def test_a_thousand_generated_requests_get_no_5xx_and_no_hang() -> None:
    # schemathesis' coverage phase alone generates ~1,800 cases (every operation's boundary and
    # invalid values) and its fuzzing phase a few more per operation: ~10 s.
    result = fuzz(max_examples=3, timeout=110)
    assert result["passed"] is True
    assert isinstance(result["cases"], int) and result["cases"] >= 1000


@pytest.mark.slow
def test_a_longer_fuzzing_run_gets_no_5xx_and_no_hang() -> None:
    result = fuzz(max_examples=100, timeout=1200)
    assert result["passed"] is True
