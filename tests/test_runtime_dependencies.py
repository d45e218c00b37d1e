"""Every service imports with only the runtime dependencies `pyproject.toml` declares.

The test environment holds the dev tools too, and they can hide a missing runtime dependency: the
ledger needed `greenlet` (sqlalchemy's asyncio), which only playwright brought, so `pip install
'.[local]' && llmbus up` crash-looped the ledger while every test passed. Here a subprocess refuses
to import any top-level module whose distribution is outside the closure of llmbus's runtime
requirements, then imports every module of `services/` and `contracts/`.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The `local` extra's modules (the embedded model servers) need that extra, by design.
OPTIONAL = ("services.local.main",)


def runtime_closure() -> set[str]:
    """The distributions `pip install llmbus` installs: its requirements without extras, transitively."""
    wanted = [(Requirement(r), "") for r in importlib.metadata.requires("llmbus") or []]
    found: set[str] = set()
    while wanted:
        requirement, extra = wanted.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        key = name + "[" + ",".join(sorted(requirement.extras)) + "]"
        if key in found:
            continue
        found.add(key)
        for extra_name in ("", *requirement.extras):
            for line in importlib.metadata.requires(name) or []:
                wanted.append((Requirement(line), extra_name))
    return {key.split("[")[0] for key in found}


GUARD = """
import importlib, importlib.abc, importlib.metadata, json, pkgutil, sys
allowed = set(json.loads(sys.argv[1]))
owners = {top: {d.lower().replace("_", "-") for d in dists}
          for top, dists in importlib.metadata.packages_distributions().items()}

class RuntimeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ("services", "contracts") or top not in owners:
            return None
        if not owners[top] & allowed:
            raise ImportError(f"{name} comes from {sorted(owners[top])}, not a runtime dependency")
        return None

sys.meta_path.insert(0, RuntimeOnly())
skip = set(sys.argv[2].split(","))
failed = []
for package in ("contracts", "services"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name in skip:
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{info.name}: {exc}")
print(json.dumps(failed))
"""


def test_every_service_imports_with_the_runtime_dependencies_alone() -> None:
    allowed = sorted(runtime_closure())
    done = subprocess.run(
        [sys.executable, "-c", GUARD, json.dumps(allowed), ",".join(OPTIONAL)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
