"""What the janitor knows of one model on its host, in one record, and the inventory entry from it.

One `ModelRecord` per model name (canonical) holds what the model server said (`/api/tags`,
`/api/ps`, `/api/show`), what the janitor learnt (last use, the Modelfile it was created from, a
failed pull or create), the pull or create running now, and what the inventory holds for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from contracts.models import ModelInfo, ModelState, Op, Progress
from services.janitor.desired import Desired
from services.runtime.backends.model_admin import Running, Tag


@dataclass
class Operation:
    """A running pull or create; more requesters of the same one just follow its events."""

    op: Op
    model: str
    subscribers: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress(status="queued"))
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Failure:
    """A pull or create that failed: retried after a while, shown as `failed` when desired."""

    error: str
    at: float  # Unix seconds


@dataclass(frozen=True)
class Context:
    """The trained context `/api/show` read from the GGUF: once per model and digest."""

    digest: str
    length: int | None


@dataclass
class ModelRecord:
    name: str  # canonical
    tag: Tag | None = None  # on the host's disk
    running: Running | None = None  # loaded
    expiry: float | None = None  # the last expiry `/api/ps` gave (moves on every use)
    last_used: float | None = None  # Unix seconds
    op: Operation | None = None  # a pull or create running now
    failed: Failure | None = None
    created: str | None = None  # digest of the Modelfile it was created from
    context: Context | None = None
    written: ModelInfo | None = None  # what the inventory holds for it

    def recall(self, info: ModelInfo) -> None:
        """What an earlier janitor of this host wrote of it: last use, the created digest, context."""
        if info.last_used is not None:
            self.last_used = info.last_used
        if info.modelfile_digest is not None:
            self.created = info.modelfile_digest
        if info.digest and info.context_length:  # no `/api/show` again after a restart
            self.context = Context(info.digest, info.context_length)

    @property
    def context_stale(self) -> bool:
        """On disk with a digest its learnt context is not of (or none learnt yet)."""
        learnt = self.context.digest if self.context is not None else ""
        return self.tag is not None and learnt != self.tag.digest

    def failed_within(self, now: float, window_s: float) -> bool:
        return self.failed is not None and now - self.failed.at < window_s

    def listed(self, desired: Desired) -> bool:
        """Whether the inventory lists it: on disk, being fetched, or desired and failed."""
        return (
            self.tag is not None
            or self.op is not None
            or (self.failed is not None and self.name in desired.models)
        )

    def info(self, host: str, desired: Desired) -> ModelInfo | None:
        """Its inventory entry, None when the inventory does not list it."""
        tag, run, op, name = self.tag, self.running, self.op, self.name
        spec = desired.models.get(name)
        state: ModelState
        if run is not None:
            state = "loaded"
        elif tag is not None:
            state = "available"  # also while it is re-pulled or re-created: the old one serves meanwhile
        elif op is not None:
            state = "pulling" if op.op == "pull" else "creating"
        elif spec is not None and self.failed is not None:
            state = "failed"
        else:
            return None
        details = tag.details if tag is not None else None
        learnt = self.context.length if self.context is not None else None
        return ModelInfo(
            host=host,
            model=name,
            state=state,
            size=tag.size if tag is not None else 0,
            size_vram=run.size_vram if run is not None else 0,
            loaded=run is not None,
            expires_at=run.expires if run is not None else None,
            last_used=self.last_used,
            pinned=spec is not None and spec.pinned,
            warm=spec is not None and spec.warm,
            idle_ttl_s=desired.ttl(name),
            family=details.family or None if details else None,
            parameter_size=details.parameter_size or None if details else None,
            quantization=details.quantization_level or None if details else None,
            context_length=(learnt or tag.context_length) if tag is not None else None,
            digest=tag.digest or None if tag is not None else None,
            modelfile_digest=self.created,
            progress=op.progress if op is not None else None,
            error=self.failed.error if self.failed is not None and op is None else None,
        )


def observe(
    records: dict[str, ModelRecord], on_disk: dict[str, Tag], loaded: dict[str, Running], now: float
) -> None:
    """Takes in what `/api/tags` and `/api/ps` said, and learns last use from it: Ollama moves a
    model's expiry on every request, so a model that just got loaded, or whose expiry moved on, has
    just been used (even by a client that bypasses llmbus)."""
    for name in on_disk.keys() | loaded.keys():
        if name not in records:
            records[name] = ModelRecord(name)
    for name, record in records.items():
        was_loaded = record.running is not None
        record.tag, record.running = on_disk.get(name), loaded.get(name)
        if record.running is None:
            record.expiry = None
            continue
        expires = record.running.expires
        moved = expires is not None and record.expiry is not None and expires > record.expiry + 0.5
        if not was_loaded or moved:
            record.last_used = max(record.last_used or 0.0, now)
        if expires is not None:
            record.expiry = expires


def context_length(show: dict[str, Any]) -> int | None:
    """`model_info["<general.architecture>.context_length"]` of an `/api/show` answer."""
    info = show.get("model_info")
    if not isinstance(info, dict):
        return None
    value = info.get(f"{info.get('general.architecture')}.context_length")
    return value if isinstance(value, int) and value > 0 else None
