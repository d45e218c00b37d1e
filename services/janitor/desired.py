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
from typing import Annotated, Any, Literal

import msgspec

from contracts import LlmbusError, canonical_model, validate_model
from services.runtime.durations import seconds

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NEVER = ("never", "off", "-1")

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


# The file's shape; values that need parsing (durations, sizes, Modelfiles) are checked after.
Duration = int | float | str | bool  # 300, "5m", "never", false


class _Defaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    idle_ttl: Duration = 300


class _Memory(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    budget: int | str | None = None  # bytes, or "12GB"
    host_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None  # a fraction in (0, 1]


class _Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    modelfile: str | None = None  # relative to the file
    warm: bool = False
    pinned: bool = False
    idle_ttl: Duration | None = None
    hosts: list[str] = []
    backends: list[Literal["ollama", "openai"]] = []


class _File(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    defaults: _Defaults = _Defaults()
    memory: _Memory = _Memory()
    models: list[_Model] = []
    costs: dict[str, Any] = {}  # the ledger's (services/ledger/costs.py)


def load(path: Path, host: str, backend: str = "ollama") -> Desired:
    """Reads the file for one host and its kind of model server (an OpenAI-compatible server
    cannot pull, so a model for Ollama only is not wanted there); a missing file means nothing is
    desired and defaults apply."""
    if not path.exists():
        return Desired()
    try:
        raw = path.read_bytes()
        doc = msgspec.convert(tomllib.loads(raw.decode()), _File)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise DesiredStateError(f"{path}: {exc}") from exc
    fingerprint = hashlib.sha256(raw)
    default_ttl = parse_duration(doc.defaults.idle_ttl, f"{path} [defaults] idle_ttl")
    budget = doc.memory.budget
    models: dict[str, ModelSpec] = {}
    for i, entry in enumerate(doc.models):
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
        memory_budget=None if budget is None else parse_size(budget, f"{path} [memory] budget"),
        host_threshold=doc.memory.host_threshold,
        fingerprint=fingerprint.hexdigest(),
    )


def _model(entry: _Model, path: Path, where: str, default_ttl: float | None) -> ModelSpec:
    try:
        validate_model(entry.name)
    except LlmbusError as exc:
        raise DesiredStateError(f"{where}: {exc.message}") from None
    modelfile = modelfile_path = None
    if entry.modelfile is not None:
        modelfile_path = (path.parent / entry.modelfile).resolve()
        try:
            modelfile = modelfile_path.read_text()
        except OSError as exc:
            raise DesiredStateError(
                f"{where}: cannot read Modelfile {modelfile_path}: {exc.strerror}"
            ) from None
    ttl = parse_duration(entry.idle_ttl, f"{where} idle_ttl") if entry.idle_ttl is not None else default_ttl
    return ModelSpec(
        name=canonical_model(entry.name),
        modelfile=modelfile,
        modelfile_path=modelfile_path,
        warm=entry.warm,
        pinned=entry.pinned,
        idle_ttl_s=ttl,
        hosts=tuple(entry.hosts),
        backends=tuple(entry.backends),
    )
