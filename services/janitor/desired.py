"""The desired state: `infra/models.toml` (and the Modelfiles it names) as typed data.

```toml
[defaults]
idle_ttl = "5m"            # unload a model nobody used this long ("never" to keep it)

[memory]
budget = "12GB"            # loaded models may use this much; least recently used go first
host_threshold = 0.85      # ...or unload while host memory use is above 85%

[[models]]
name = "llama3.2:1b"       # pulled when missing
warm = true                # loaded at start
pinned = true              # never unloaded
idle_ttl = "30m"
hosts = ["gpu1"]           # only on these hosts (default: every host)
backends = ["ollama"]      # only where the janitor's model server is of these kinds (ollama, openai)

[[models]]
name = "badges"
modelfile = "models/badges.Modelfile"   # created from it, relative to this file
```
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts import LlmbusError, canonical_model, validate_model
from services.runtime.durations import seconds

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NEVER = ("never", "off", "-1")
_BACKENDS = ("ollama", "openai")

log = logging.getLogger("llmbus.janitor")


class DesiredStateError(ValueError):
    """models.toml (or a Modelfile it names) cannot be used; the message says where and why."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # canonical
    modelfile: str | None = None  # the Modelfile's text: create the model from it
    modelfile_path: Path | None = None
    warm: bool = False
    pinned: bool = False
    idle_ttl_s: float | None = None
    hosts: tuple[str, ...] = ()  # empty: every host
    backends: tuple[str, ...] = ()  # empty: every kind of model server

    @property
    def modelfile_digest(self) -> str | None:
        return None if self.modelfile is None else hashlib.sha256(self.modelfile.encode()).hexdigest()


@dataclass(frozen=True)
class Desired:
    models: dict[str, ModelSpec] = field(default_factory=dict)  # canonical name -> spec, this host's
    default_ttl_s: float | None = 300.0
    memory_budget: int | None = None
    host_threshold: float | None = None
    fingerprint: str = ""  # changes whenever the file or a Modelfile it names changes

    def ttl(self, model: str) -> float | None:
        spec = self.models.get(model)
        return spec.idle_ttl_s if spec is not None else self.default_ttl_s

    def pinned(self, model: str) -> bool:
        spec = self.models.get(model)
        return spec is not None and spec.pinned


class DesiredFile:
    """models.toml read again and again: the new state when it changed, its errors logged once."""

    def __init__(self, path: Path, host: str, backend: str) -> None:
        self.path, self.host, self.backend = path, host, backend
        self._error: str | None = None  # the last error in the file, logged once

    def read(self, current: Desired) -> Desired | None:
        """The desired state if it differs from `current`; None when unchanged or broken (a broken
        edit keeps the previous state, and says why in the log)."""
        try:
            new = load(self.path, self.host, self.backend)
        except DesiredStateError as exc:
            if self._error != str(exc):
                log.error("ignoring %s: %s", self.path, exc)
                self._error = str(exc)
            return None
        self._error = None
        if new.fingerprint == current.fingerprint:
            return None
        if current.fingerprint or new.models:
            log.info("desired state: %d models from %s", len(new.models), self.path)
        return new


def parse_duration(value: Any, where: str) -> float | None:
    """Seconds from `300`, `"5m"`, `"1h30m"`, `"0.5s"`; None (never) from `"never"`, `false`, `-1`."""
    if value is False or (isinstance(value, str) and value.strip().lower() in _NEVER):
        return None
    try:
        duration = seconds(value)
    except ValueError:
        raise DesiredStateError(f'{where}: {value!r} is not a duration (e.g. 300, "5m", "never")') from None
    return None if duration < 0 else duration


def parse_size(value: Any, where: str) -> int:
    """Bytes from `12000000000`, `"12GB"`, `"11.2 GiB"`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise DesiredStateError(f'{where}: {value!r} is not a size (e.g. "12GB", "8GiB")')
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise DesiredStateError(f"{where}: [{key}] must be a table")
    return value


def _known(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise DesiredStateError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def load(path: Path, host: str, backend: str = "ollama") -> Desired:
    """Reads the file for one host and its kind of model server (an OpenAI-compatible server
    cannot pull, so a model for Ollama only is not wanted there); a missing file means nothing is
    desired and defaults apply."""
    if not path.exists():
        return Desired()
    try:
        raw = path.read_bytes()
        doc = tomllib.loads(raw.decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DesiredStateError(f"{path}: {exc}") from exc
    _known(doc, {"defaults", "memory", "models", "costs"}, str(path))  # [costs]: the ledger's
    fingerprint = hashlib.sha256(raw)

    defaults = _table(doc, "defaults", str(path))
    _known(defaults, {"idle_ttl"}, f"{path} [defaults]")
    default_ttl = parse_duration(defaults.get("idle_ttl", 300), f"{path} [defaults] idle_ttl")

    memory = _table(doc, "memory", str(path))
    _known(memory, {"budget", "host_threshold"}, f"{path} [memory]")
    budget = parse_size(memory["budget"], f"{path} [memory] budget") if "budget" in memory else None
    threshold = memory.get("host_threshold")
    if threshold is not None and not (isinstance(threshold, int | float) and 0 < threshold <= 1):
        raise DesiredStateError(f"{path} [memory] host_threshold: must be a fraction in (0, 1]")

    entries = doc.get("models", [])
    if not isinstance(entries, list):
        raise DesiredStateError(f"{path}: models must be an array of tables ([[models]])")
    models: dict[str, ModelSpec] = {}
    for i, entry in enumerate(entries):
        spec = _model(entry, path, f"{path} [[models]] #{i + 1}", default_ttl)
        if (spec.hosts and host not in spec.hosts) or (spec.backends and backend not in spec.backends):
            continue
        if spec.name in models:
            raise DesiredStateError(f"{path}: model {spec.name!r} is listed twice")
        if spec.modelfile is not None:
            fingerprint.update(spec.modelfile.encode())
        models[spec.name] = spec
    return Desired(
        models=models,
        default_ttl_s=default_ttl,
        memory_budget=budget,
        host_threshold=None if threshold is None else float(threshold),
        fingerprint=fingerprint.hexdigest(),
    )


def _model(entry: Any, path: Path, where: str, default_ttl: float | None) -> ModelSpec:
    if not isinstance(entry, dict):
        raise DesiredStateError(f"{where}: must be a table")
    _known(entry, {"name", "modelfile", "warm", "pinned", "idle_ttl", "hosts", "backends"}, where)
    name = entry.get("name")
    if not isinstance(name, str):
        raise DesiredStateError(f"{where}: `name` is required")
    try:
        validate_model(name)
    except LlmbusError as exc:
        raise DesiredStateError(f"{where}: {exc.message}") from None
    for flag in ("warm", "pinned"):
        if not isinstance(entry.get(flag, False), bool):
            raise DesiredStateError(f"{where}: `{flag}` must be true or false")
    hosts = entry.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise DesiredStateError(f"{where}: `hosts` must be a list of host names")
    backends = entry.get("backends", [])
    if not isinstance(backends, list) or not set(backends) <= set(_BACKENDS):
        raise DesiredStateError(f"{where}: `backends` must be a list of {' and '.join(_BACKENDS)}")
    modelfile = modelfile_path = None
    if "modelfile" in entry:
        modelfile_path = (path.parent / str(entry["modelfile"])).resolve()
        try:
            modelfile = modelfile_path.read_text()
        except OSError as exc:
            raise DesiredStateError(
                f"{where}: cannot read Modelfile {modelfile_path}: {exc.strerror}"
            ) from None
    ttl = parse_duration(entry["idle_ttl"], f"{where} idle_ttl") if "idle_ttl" in entry else default_ttl
    return ModelSpec(
        name=canonical_model(name),
        modelfile=modelfile,
        modelfile_path=modelfile_path,
        warm=bool(entry.get("warm", False)),
        pinned=bool(entry.get("pinned", False)),
        idle_ttl_s=ttl,
        hosts=tuple(hosts),
        backends=tuple(backends),
    )
