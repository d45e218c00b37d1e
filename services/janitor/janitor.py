"""One model host's keeper: what is there, what should be, and the steps between.

The host is an Ollama or an OpenAI-compatible server, behind one `ModelAdmin` protocol; what the
server cannot do (`admin.supports`) is refused with `bad_request` and left out of the policy.
`tick()` (every `LLMBUS_JANITOR_INTERVAL_S`) reads `/api/tags` and `/api/ps`, learns last use,
re-pins pinned models, unloads what the policy says and writes the inventory. `reconcile()` (at
start, when models.toml changes, and every `LLMBUS_JANITOR_RECONCILE_S`) pulls and creates what is
missing and warms what should be warm. Pulls and creates run as tasks, so the policy keeps running
while a large model downloads; every step is published as a `ModelEvent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import (
    ModelEvent,
    ModelInfo,
    ModelState,
    Op,
    OpDone,
    OpError,
    OpProgress,
    Progress,
    StatusLine,
    UnloadReason,
    UsageEvent,
    canonical_model,
)
from contracts.usage import CACHE_HOST
from services.janitor import desired as desired_state
from services.janitor import metrics, modelfile, policy
from services.runtime.backends.model_admin import CreateSpec, ModelAdmin, Running, Status, Tag, cannot
from services.runtime.inventory import decode_info, encode_info

log = logging.getLogger("llmbus.janitor")

_encode = msgspec.json.Encoder().encode
_FOREVER_S = 50 * 365 * 86400  # an expiry further away than this is keep_alive -1 (pinned)
_RETRY_FAILED_S = 60.0  # a failed pull or create is retried after this long
_PROGRESS_EVERY_S = 0.2  # progress events per operation at most this often (Ollama sends many)


@dataclass
class Operation:
    """A running pull or create; more requesters of the same one just follow its events."""

    op: Op
    model: str
    subscribers: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress(status="queued"))
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Janitor:
    def __init__(
        self,
        nc: Client,
        kv: KeyValue,
        admin: ModelAdmin,
        *,
        host: str,
        models_file: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nc = nc
        self.kv = kv
        self.admin = admin
        self.host = host
        self.models_file = models_file
        self.clock = clock
        self.desired = desired_state.Desired()
        self.tags: dict[str, Tag] = {}
        self.running: dict[str, Running] = {}
        self.last_used: dict[str, float] = {}
        self.ops: dict[str, Operation] = {}
        self.failed: dict[str, tuple[str, float]] = {}  # model -> (error, when)
        self.created: dict[str, str] = {}  # model -> digest of the Modelfile it was created from
        self.reachable: bool | None = None
        self.reconcile_now = asyncio.Event()
        self._expiry: dict[str, float] = {}
        # model -> (digest, trained context): `/api/show` reads the GGUF, so once per model and digest
        self._contexts: dict[str, tuple[str, int | None]] = {}
        self._warmed: set[desired_state.ModelSpec] = set()
        self._written: dict[str, ModelInfo] = {}
        self._lock = asyncio.Lock()
        self._bad_file: str | None = None  # the last error in models.toml, logged once

    # -- state from the bus, the file and Ollama

    async def restore(self) -> None:
        """Picks up what an earlier janitor of this host wrote: last use and created digests."""
        watcher = await self.kv.watch(subjects.inventory_host_keys(self.host))
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    continue
                with contextlib.suppress(msgspec.DecodeError):
                    info = decode_info(entry.value)
                    self._written[entry.key] = info
                    if info.last_used is not None:
                        self.last_used[info.model] = info.last_used
                    if info.modelfile_digest is not None:
                        self.created[info.model] = info.modelfile_digest
                    if info.digest and info.context_length:  # no `/api/show` again after a restart
                        self._contexts[info.model] = (info.digest, info.context_length)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def reload_desired(self) -> None:
        """Re-reads models.toml; a broken edit keeps the previous state (and says why in the log)."""
        try:
            new = desired_state.load(self.models_file, self.host, self.admin.kind)
        except desired_state.DesiredStateError as exc:
            if self._bad_file != str(exc):
                log.error("ignoring %s: %s", self.models_file, exc)
                self._bad_file = str(exc)
            return
        self._bad_file = None
        if new.fingerprint != self.desired.fingerprint:
            if self.desired.fingerprint or new.models:
                log.info("desired state: %d models from %s", len(new.models), self.models_file)
            self.desired = new
            self.reconcile_now.set()

    def on_usage(self, event: UsageEvent) -> None:
        if event.host == CACHE_HOST:  # answered from the edge's response cache: the model was not used
            return
        name = canonical_model(event.model)
        if name in self.tags and event.at > self.last_used.get(name, 0.0):
            self.last_used[name] = event.at

    async def refresh(self) -> None:
        """Reads `/api/tags` and `/api/ps`; raises `LlmbusError` when Ollama is unreachable."""
        try:
            tags, running = await asyncio.gather(self.admin.tags(), self.admin.ps())
        except LlmbusError as exc:
            if self.reachable is not False:
                log.warning("%s; retrying every tick", exc.message)
            self.reachable = False
            raise
        if self.reachable is False:
            log.info("the model server at %s is reachable again", self.admin.url)
        self.reachable = True
        now = self.clock()
        self.tags = {canonical_model(t.name): t for t in tags}
        previous, self.running = self.running, {canonical_model(r.name): r for r in running}
        for name, model in self.running.items():
            expires = model.expires
            # Ollama moves a model's expiry on every request: a model that just got loaded, or
            # whose expiry moved on, has just been used (even by a client that bypasses llmbus).
            moved = expires is not None and expires > self._expiry.get(name, expires) + 0.5
            if name not in previous or moved:
                self.last_used[name] = max(self.last_used.get(name, 0.0), now)
            if expires is not None:
                self._expiry[name] = expires
        for name in set(self._expiry) - set(self.running):
            del self._expiry[name]
        await self._learn_contexts()

    async def _learn_contexts(self) -> None:
        """The trained context of every model that is new (or changed digest) since the last look."""
        for name in set(self._contexts) - set(self.tags):
            del self._contexts[name]
        new = [(n, t.digest) for n, t in self.tags.items() if self._contexts.get(n, ("", 0))[0] != t.digest]
        if not new:
            return
        shown = await asyncio.gather(*(self.admin.show(name) for name, _ in new), return_exceptions=True)
        for (name, digest), answer in zip(new, shown, strict=True):
            if isinstance(answer, BaseException):  # gone meanwhile, or Ollama hiccuped: next refresh
                log.debug("show %s failed: %s", name, answer)
                continue
            self._contexts[name] = (digest, context_length(answer))

    # -- the inventory

    def entry(self, name: str) -> ModelInfo | None:
        tag, run, op = self.tags.get(name), self.running.get(name), self.ops.get(name)
        spec = self.desired.models.get(name)
        state: ModelState
        if run is not None:
            state = "loaded"
        elif tag is not None:
            state = "available"  # also while it is re-pulled or re-created: the old one serves meanwhile
        elif op is not None:
            state = "pulling" if op.op == "pull" else "creating"
        elif spec is not None and name in self.failed:
            state = "failed"
        else:
            return None
        details = tag.details if tag is not None else None
        return ModelInfo(
            host=self.host,
            model=name,
            state=state,
            size=tag.size if tag is not None else 0,
            size_vram=run.size_vram if run is not None else 0,
            loaded=run is not None,
            expires_at=run.expires if run is not None else None,
            last_used=self.last_used.get(name),
            pinned=spec is not None and spec.pinned,
            warm=spec is not None and spec.warm,
            idle_ttl_s=self.desired.ttl(name),
            family=details.family or None if details else None,
            parameter_size=details.parameter_size or None if details else None,
            quantization=details.quantization_level or None if details else None,
            context_length=(self._contexts.get(name, ("", None))[1] or tag.context_length)
            if tag is not None
            else None,
            digest=tag.digest or None if tag is not None else None,
            modelfile_digest=self.created.get(name),
            progress=op.progress if op is not None else None,
            error=self.failed[name][0] if name in self.failed and op is None else None,
        )

    def models(self) -> list[ModelInfo]:
        names = set(self.tags) | set(self.ops) | (set(self.failed) & set(self.desired.models))
        return [info for name in sorted(names) if (info := self.entry(name)) is not None]

    async def publish_inventory(self) -> None:
        """Writes the entries that changed and deletes those of models that are gone."""
        now = self.clock()
        current = {subjects.inventory_key(self.host, info.model): info for info in self.models()}
        for key, info in current.items():
            old = self._written.get(key)
            if old is not None and msgspec.structs.replace(old, updated_at=0.0) == info:
                continue
            info.updated_at = now
            await self.kv.put(key, encode_info(info))
            self._written[key] = info
        for key in set(self._written) - set(current):
            with contextlib.suppress(Exception):
                await self.kv.delete(key)
            del self._written[key]

    async def sync(self) -> list[ModelInfo]:
        """Refresh from Ollama and write the inventory, one at a time; returns this host's entries."""
        async with self._lock:
            await self.refresh()
            await self.publish_inventory()
            return sorted(self._written.values(), key=lambda info: info.model)

    # -- the policy

    async def tick(self) -> None:
        self.reload_desired()
        try:
            async with self._lock:
                await self.refresh()
                await self._enforce()
                await self.publish_inventory()
        except LlmbusError:
            return  # Ollama unreachable: logged once by refresh; the inventory stays as it was

    async def _enforce(self) -> None:
        now = self.clock()
        for name, spec in self.desired.models.items():
            if not spec.pinned or name in self.ops or name not in self.tags:
                continue
            if not self.admin.supports("load", name):
                continue
            expires = self._expiry.get(name)
            # A pinned model must stay loaded even after a request set a shorter keep_alive (a
            # server without expiries, like llama.cpp's router, only needs it loaded).
            if name not in self.running or (expires is not None and expires - now < _FOREVER_S):
                try:
                    await self._load(name, -1, refresh=False)
                except LlmbusError as exc:
                    log.warning("keeping pinned %s loaded failed: %s", name, exc.message)
        loaded = [
            policy.Loaded(
                model=name,
                size=run.size,
                last_used=self.last_used.get(name, now),
                idle_ttl_s=self.desired.ttl(name),
                pinned=self.desired.pinned(name),
            )
            for name, run in self.running.items()
            if self.admin.supports("unload", name)  # a server that cannot unload keeps what it has
        ]
        host = policy.read_host_memory() if self.desired.host_threshold is not None else None
        unloads = policy.plan(
            loaded,
            now,
            budget=self.desired.memory_budget,
            host=host,
            host_threshold=self.desired.host_threshold,
        )
        for unload in unloads:
            await self._unload(unload.model, unload.reason)
        if unloads:
            await self.refresh()

    async def _unload(self, name: str, reason: UnloadReason) -> None:
        try:
            await self.admin.unload(name)
        except LlmbusError as exc:
            log.warning("unloading %s failed: %s", name, exc.message)
            return
        log.info("unloaded %s (%s)", name, reason.replace("_", " "))
        metrics.UNLOADS.labels(reason).inc()
        self.running.pop(name, None)
        await self._event(OpDone(host=self.host, model=name, op="unload", reason=reason))

    async def _load(self, name: str, keep_alive_s: float | None, *, refresh: bool = True) -> None:
        await self.admin.load(name, keep_alive_s)
        self.last_used[name] = self.clock()
        forever = keep_alive_s is None or keep_alive_s < 0
        log.info("loaded %s (keep_alive %s)", name, "forever" if forever else f"{keep_alive_s:g}s")
        if refresh:
            await self.refresh()
        await self._event(OpDone(host=self.host, model=name, op="load", info=self.entry(name)))

    # -- reconcile: desired state -> Ollama

    async def reconcile(self) -> None:
        self.reconcile_now.clear()
        try:
            await self.sync()
        except LlmbusError:
            return
        now = self.clock()
        for name, spec in list(self.desired.models.items()):
            if name in self.ops or now - self.failed.get(name, ("", -1e18))[1] < _RETRY_FAILED_S:
                continue
            try:
                if spec.modelfile is not None:
                    if name not in self.tags or self.created.get(name) != spec.modelfile_digest:
                        await self._wait(self.start_create(name, spec.modelfile, spec.modelfile_path))
                elif name not in self.tags:
                    await self._wait(self.start_pull(name))
            except LlmbusError as exc:  # a Modelfile the janitor cannot use, or a server that cannot pull
                if self.failed.get(name, ("", 0.0))[0] != exc.message:  # once, not every minute
                    log.error("cannot %s %s: %s", "create" if spec.modelfile else "pull", name, exc.message)
                self.failed[name] = (exc.message, now)
        for name, spec in list(self.desired.models.items()):
            warm = (spec.warm or spec.pinned) and self.admin.supports("load", name)
            if not warm or spec in self._warmed or name not in self.tags or name in self.ops:
                continue
            self._warmed.add(spec)
            if name not in self.running:
                try:
                    async with self._lock:
                        await self._load(name, -1 if spec.pinned else spec.idle_ttl_s)
                        await self.publish_inventory()
                except LlmbusError as exc:
                    log.warning("warming %s failed: %s", name, exc.message)

    @staticmethod
    async def _wait(operation: Operation) -> None:
        await operation.done.wait()

    # -- operations: pull and create run as tasks and report through events

    def start_pull(self, model: str, progress: str | None = None) -> Operation:
        if not self.admin.supports("pull"):
            raise cannot("pull", self.admin.url)
        return self._start("pull", canonical_model(model), progress, lambda: self._pull_steps(model))

    def start_create(
        self,
        model: str,
        text: str,
        path: Path | None = None,
        progress: str | None = None,
        spec: CreateSpec | None = None,  # already parsed (admin.py), `text` then names it
    ) -> Operation:
        if not self.admin.supports("create"):
            raise cannot("create", self.admin.url)
        name = canonical_model(model)
        spec = spec or modelfile.parse(text, path.parent if path is not None else None)  # bad input fails now
        digest = desired_state.ModelSpec(name=name, modelfile=text).modelfile_digest
        assert digest is not None
        return self._start("create", name, progress, lambda: self._create_steps(name, spec, digest))

    def _start(
        self, op: Op, name: str, progress: str | None, steps: Callable[[], AsyncIterator[Status]]
    ) -> Operation:
        running = self.ops.get(name)
        if running is not None:
            if running.op != op:
                raise _busy(running)
            if progress:
                running.subscribers.append(progress)
            return running
        operation = Operation(op=op, model=name, subscribers=[progress] if progress else [])
        self.ops[name] = operation
        operation.task = asyncio.create_task(self._operate(operation, steps))
        return operation

    async def _operate(self, operation: Operation, steps: Callable[[], AsyncIterator[Status]]) -> None:
        name, op = operation.model, operation.op
        layers: dict[str, tuple[int, int]] = {}
        last_sent = 0.0
        log.info("%s %s started", op, name)
        try:
            with contextlib.suppress(Exception):
                async with self._lock:  # `pulling` at once: the edge answers "retry" meanwhile
                    await self.publish_inventory()
            async for status in steps():
                if status.digest and status.total:
                    layers[status.digest] = (status.completed, status.total)
                operation.progress = Progress(
                    status=status.status,
                    completed=sum(c for c, _ in layers.values()),
                    total=sum(t for _, t in layers.values()),
                )
                now = time.monotonic()
                if now - last_sent >= _PROGRESS_EVERY_S or status.completed in (0, status.total):
                    last_sent = now
                    line = StatusLine(status.status, status.digest, status.total, status.completed)
                    event = OpProgress(
                        host=self.host, model=name, op=op, progress=operation.progress, line=line
                    )
                    await self._event(event, operation)
            self.failed.pop(name, None)
            async with self._lock:
                with contextlib.suppress(LlmbusError):
                    await self.refresh()
                del self.ops[name]
                await self.publish_inventory()
            log.info("%s %s done", op, name)
            metrics.OPERATIONS.labels(op, "ok").inc()
            await self._event(OpDone(host=self.host, model=name, op=op, info=self.entry(name)), operation)
        except Exception as exc:
            error = exc if isinstance(exc, LlmbusError) else LlmbusError(ErrorCode.INTERNAL, repr(exc))
            if not isinstance(exc, LlmbusError):
                log.error("%s %s failed", op, name, exc_info=exc)
            else:
                log.warning("%s %s failed: %s", op, name, error.message)
            self.ops.pop(name, None)
            self.failed[name] = (error.message, self.clock())
            metrics.OPERATIONS.labels(op, "error").inc()
            with contextlib.suppress(Exception):
                async with self._lock:
                    await self.publish_inventory()
            await self._event(
                OpError(host=self.host, model=name, op=op, code=error.code, message=error.message), operation
            )
        finally:
            operation.done.set()

    async def _pull_steps(self, model: str) -> AsyncIterator[Status]:
        async for status in self.admin.pull(model):
            yield status

    async def _create_steps(self, name: str, spec: CreateSpec, digest: str) -> AsyncIterator[Status]:
        if spec.from_ and canonical_model(spec.from_) not in self.tags:
            # Ollama would pull the base itself; doing it here shows its progress too.
            async for status in self.admin.pull(spec.from_):
                yield msgspec.structs.replace(status, status=f"{spec.from_}: {status.status}")
        async for status in self.admin.create(name, spec):
            yield status
        self.created[name] = digest

    async def _event(self, event: ModelEvent, operation: Operation | None = None) -> None:
        data = _encode(event)
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.model_event_subject(self.host, event.model), data)
            for subject in operation.subscribers if operation is not None else ():
                await self.nc.publish(subject, data)

    # -- the admin API's one-shot operations

    async def load(self, model: str, keep_alive_s: float | None) -> ModelInfo:
        name = canonical_model(model)
        async with self._lock:
            await self.refresh()
            if name not in self.tags:
                raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not on {self.host}")
            if not self.admin.supports("load", name):
                raise cannot("load", self.admin.url)
            ttl = self.desired.ttl(name)
            keep = -1 if self.desired.pinned(name) else keep_alive_s if keep_alive_s is not None else ttl
            await self._load(name, keep)
            await self.publish_inventory()
        return self._require_entry(name)

    async def unload(self, model: str) -> ModelInfo:
        name = canonical_model(model)
        if self.desired.pinned(name):
            raise LlmbusError(
                ErrorCode.BAD_REQUEST,
                f"model {model!r} is pinned in {self.models_file}; unpin it there first",
            )
        async with self._lock:
            await self.refresh()
            if name not in self.tags:
                raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not on {self.host}")
            if not self.admin.supports("unload", name):
                raise cannot("unload", self.admin.url)
            if name in self.running:
                await self._unload(name, "admin")
            await self.refresh()
            await self.publish_inventory()
        return self._require_entry(name)

    async def copy(self, source: str, destination: str) -> ModelInfo:
        await self.admin.copy(source, destination)
        name = canonical_model(destination)
        await self.sync()
        await self._event(OpDone(host=self.host, model=name, op="copy", info=self.entry(name)))
        return self._require_entry(name)

    async def delete(self, model: str) -> None:
        name = canonical_model(model)
        if name in self.ops:
            raise _busy(self.ops[name])
        await self.admin.delete(model)
        self.created.pop(name, None)
        self.last_used.pop(name, None)
        await self.sync()
        await self._event(OpDone(host=self.host, model=name, op="delete"))

    def _require_entry(self, name: str) -> ModelInfo:
        info = self.entry(name)
        if info is None:
            raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not on {self.host}")
        return info


def context_length(show: dict[str, Any]) -> int | None:
    """`model_info["<general.architecture>.context_length"]` of an `/api/show` answer."""
    info = show.get("model_info")
    if not isinstance(info, dict):
        return None
    value = info.get(f"{info.get('general.architecture')}.context_length")
    return value if isinstance(value, int) and value > 0 else None


def _busy(operation: Operation) -> LlmbusError:
    doing = "pulled" if operation.op == "pull" else "created"
    return LlmbusError(ErrorCode.BAD_REQUEST, f"model {operation.model!r} is being {doing} right now")
