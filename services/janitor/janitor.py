"""One model host's keeper: what is there, what should be, and the steps between.

The host is an Ollama or an OpenAI-compatible server, behind one `ModelAdmin` protocol; what the
server cannot do (`admin.supports`) is refused with `bad_request` and left out of the policy.
Everything known of one model is its `ModelRecord` (record.py). `tick()` (every
`LLMBUS_JANITOR_INTERVAL_S`) reads `/api/tags` and `/api/ps`, learns last use, re-pins pinned
models, unloads what the policy says and writes the inventory. `reconcile()` (at start, when
models.toml changes, and every `LLMBUS_JANITOR_RECONCILE_S`) pulls and creates what is missing and
warms what should be warm. Pulls and creates run as tasks (operations.py), so the policy keeps
running while a large model downloads; every step is published as a `ModelEvent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import ModelEvent, ModelInfo, OpDone, UnloadReason, UsageEvent, canonical_model
from contracts.usage import CACHE_HOST
from services.janitor import desired as desired_state
from services.janitor import metrics, policy
from services.janitor.operations import Operations, busy
from services.janitor.record import Context, Failure, ModelRecord, Operation, context_length, observe
from services.runtime.backends.model_admin import CreateSpec, ModelAdmin, Running, cannot
from services.runtime.inventory import decode_info, encode_info

log = logging.getLogger("llmbus.janitor")

_encode = msgspec.json.Encoder().encode
_FOREVER_S = 50 * 365 * 86400  # an expiry further away than this is keep_alive -1 (pinned)
_RETRY_FAILED_S = 60.0  # a failed pull or create is retried after this long


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
        self.records: dict[str, ModelRecord] = {}  # canonical name -> all the janitor knows of it
        self.reachable: bool | None = None
        self.reconcile_now = asyncio.Event()
        self.lock = asyncio.Lock()
        self.operations = Operations(self)
        self._warmed: set[desired_state.ModelSpec] = set()
        self._stray: set[str] = set()  # inventory keys of this host no model's record names
        self._desired_file = desired_state.DesiredFile(models_file, host, admin.kind)

    def record(self, name: str) -> ModelRecord:
        """The model's record, made on first mention."""
        found = self.records.get(name)
        if found is None:
            found = self.records[name] = ModelRecord(name)
        return found

    def tagged(self, name: str) -> bool:
        """Whether the model is on the host's disk."""
        found = self.records.get(name)
        return found is not None and found.tag is not None

    def _loaded(self, name: str) -> bool:
        found = self.records.get(name)
        return found is not None and found.running is not None

    def _operation(self, name: str) -> Operation | None:
        found = self.records.get(name)
        return found.op if found is not None else None

    @property
    def ops(self) -> dict[str, Operation]:
        """The pulls and creates running now, by model."""
        return {name: r.op for name, r in self.records.items() if r.op is not None}

    @property
    def running(self) -> dict[str, Running]:
        """The loaded models, by name (the janitor's metrics read them)."""
        return {name: r.running for name, r in self.records.items() if r.running is not None}

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
                    record = self.record(info.model)
                    record.recall(info)
                    if entry.key == subjects.inventory_key(self.host, info.model):
                        record.written = info
                    else:
                        self._stray.add(entry.key)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def reload_desired(self) -> None:
        """Re-reads models.toml; a broken edit keeps the previous state (and says why in the log)."""
        new = self._desired_file.read(self.desired)
        if new is not None:
            self.desired = new
            self.reconcile_now.set()

    def on_usage(self, event: UsageEvent) -> None:
        if event.host == CACHE_HOST:  # answered from the edge's response cache: the model was not used
            return
        found = self.records.get(canonical_model(event.model))
        if found is not None and found.tag is not None and event.at > (found.last_used or 0.0):
            found.last_used = event.at

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
        on_disk = {canonical_model(t.name): t for t in tags}
        observe(self.records, on_disk, {canonical_model(r.name): r for r in running}, self.clock())
        await self._learn_contexts()

    async def _learn_contexts(self) -> None:
        """The trained context of every model that is new (or changed digest) since the last look."""
        for record in self.records.values():
            if record.tag is None:
                record.context = None
        new = [(r, r.tag.digest) for r in self.records.values() if r.tag is not None and r.context_stale]
        if not new:
            return
        shown = await asyncio.gather(*(self.admin.show(r.name) for r, _ in new), return_exceptions=True)
        for (record, digest), answer in zip(new, shown, strict=True):
            if isinstance(answer, BaseException):  # gone meanwhile, or Ollama hiccuped: next refresh
                log.debug("show %s failed: %s", record.name, answer)
                continue
            record.context = Context(digest, context_length(answer))

    # -- the inventory

    def entry(self, name: str) -> ModelInfo | None:
        found = self.records.get(name)
        return found.info(self.host, self.desired) if found is not None else None

    def models(self) -> list[ModelInfo]:
        listed = (r for _, r in sorted(self.records.items()) if r.listed(self.desired))
        return [info for r in listed if (info := r.info(self.host, self.desired)) is not None]

    async def publish_inventory(self) -> None:
        """Writes the entries that changed and deletes those of models that are gone."""
        now = self.clock()
        current = {info.model: info for info in self.models()}
        for name, info in current.items():
            record = self.records[name]
            old = record.written
            if old is not None and msgspec.structs.replace(old, updated_at=0.0) == info:
                continue
            info.updated_at = now
            await self.kv.put(subjects.inventory_key(self.host, name), encode_info(info))
            record.written = info
        gone = [r for r in self.records.values() if r.written is not None and r.name not in current]
        for record in gone:
            with contextlib.suppress(Exception):
                await self.kv.delete(subjects.inventory_key(self.host, record.name))
            record.written = None
        for key in self._stray:
            with contextlib.suppress(Exception):
                await self.kv.delete(key)
        self._stray.clear()

    async def sync(self) -> list[ModelInfo]:
        """Refresh from Ollama and write the inventory, one at a time; returns this host's entries."""
        async with self.lock:
            await self.refresh()
            await self.publish_inventory()
            written = [r.written for r in self.records.values() if r.written is not None]
            return sorted(written, key=lambda info: info.model)

    # -- the policy

    async def tick(self) -> None:
        self.reload_desired()
        try:
            async with self.lock:
                await self.refresh()
                await self._enforce()
                await self.publish_inventory()
        except LlmbusError:
            return  # Ollama unreachable: logged once by refresh; the inventory stays as it was

    async def _enforce(self) -> None:
        now = self.clock()
        for name, spec in self.desired.models.items():
            found = self.records.get(name)
            if not spec.pinned or found is None or found.op is not None or found.tag is None:
                continue
            if not self.admin.supports("load", name):
                continue
            # A pinned model must stay loaded even after a request set a shorter keep_alive (a
            # server without expiries, like llama.cpp's router, only needs it loaded).
            expires = found.expiry
            if found.running is None or (expires is not None and expires - now < _FOREVER_S):
                try:
                    await self._load(name, -1, refresh=False)
                except LlmbusError as exc:
                    log.warning("keeping pinned %s loaded failed: %s", name, exc.message)
        loaded = [
            policy.Loaded(
                model=name,
                size=record.running.size,
                last_used=record.last_used if record.last_used is not None else now,
                idle_ttl_s=self.desired.ttl(name),
                pinned=self.desired.pinned(name),
            )
            for name, record in self.records.items()
            if record.running is not None
            and self.admin.supports("unload", name)  # a server that cannot unload keeps what it has
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
        self.record(name).running = None
        await self.event(OpDone(host=self.host, model=name, op="unload", reason=reason))

    async def _load(self, name: str, keep_alive_s: float | None, *, refresh: bool = True) -> None:
        await self.admin.load(name, keep_alive_s)
        self.record(name).last_used = self.clock()
        forever = keep_alive_s is None or keep_alive_s < 0
        log.info("loaded %s (keep_alive %s)", name, "forever" if forever else f"{keep_alive_s:g}s")
        if refresh:
            await self.refresh()
        await self.event(OpDone(host=self.host, model=name, op="load", info=self.entry(name)))

    # -- reconcile: desired state -> Ollama

    async def reconcile(self) -> None:
        self.reconcile_now.clear()
        try:
            await self.sync()
        except LlmbusError:
            return
        now = self.clock()
        for name, spec in list(self.desired.models.items()):
            record = self.record(name)
            if record.op is not None or (
                record.failed is not None and now - record.failed.at < _RETRY_FAILED_S
            ):
                continue
            try:
                if spec.modelfile is not None:
                    if record.tag is None or record.created != spec.modelfile_digest:
                        await self._wait(self.start_create(name, spec.modelfile, spec.modelfile_path))
                elif record.tag is None:
                    await self._wait(self.start_pull(name))
            except LlmbusError as exc:  # a Modelfile the janitor cannot use, or a server that cannot pull
                if record.failed is None or record.failed.error != exc.message:  # once, not every minute
                    log.error("cannot %s %s: %s", "create" if spec.modelfile else "pull", name, exc.message)
                record.failed = Failure(exc.message, now)
        for name, spec in list(self.desired.models.items()):
            warm = (spec.warm or spec.pinned) and self.admin.supports("load", name)
            if not warm or spec in self._warmed or not self.tagged(name) or self._operation(name):
                continue
            self._warmed.add(spec)
            if not self._loaded(name):
                try:
                    async with self.lock:
                        await self._load(name, -1 if spec.pinned else spec.idle_ttl_s)
                        await self.publish_inventory()
                except LlmbusError as exc:
                    log.warning("warming %s failed: %s", name, exc.message)

    @staticmethod
    async def _wait(operation: Operation) -> None:
        await operation.done.wait()

    # -- operations (operations.py) and their events

    def start_pull(self, model: str, progress: str | None = None) -> Operation:
        return self.operations.start_pull(model, progress)

    def start_create(
        self,
        model: str,
        text: str,
        path: Path | None = None,
        progress: str | None = None,
        spec: CreateSpec | None = None,  # already parsed (admin.py), `text` then names it
    ) -> Operation:
        return self.operations.start_create(model, text, path, progress, spec)

    async def event(self, event: ModelEvent, operation: Operation | None = None) -> None:
        data = _encode(event)
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.model_event_subject(self.host, event.model), data)
            for subject in operation.subscribers if operation is not None else ():
                await self.nc.publish(subject, data)

    # -- the admin API's one-shot operations

    async def load(self, model: str, keep_alive_s: float | None) -> ModelInfo:
        name = canonical_model(model)
        async with self.lock:
            await self.refresh()
            if not self.tagged(name):
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
        async with self.lock:
            await self.refresh()
            if not self.tagged(name):
                raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not on {self.host}")
            if not self.admin.supports("unload", name):
                raise cannot("unload", self.admin.url)
            if self._loaded(name):
                await self._unload(name, "admin")
            await self.refresh()
            await self.publish_inventory()
        return self._require_entry(name)

    async def copy(self, source: str, destination: str) -> ModelInfo:
        await self.admin.copy(source, destination)
        name = canonical_model(destination)
        await self.sync()
        await self.event(OpDone(host=self.host, model=name, op="copy", info=self.entry(name)))
        return self._require_entry(name)

    async def delete(self, model: str) -> None:
        name = canonical_model(model)
        running = self._operation(name)
        if running is not None:
            raise busy(running)
        await self.admin.delete(model)
        found = self.records.get(name)
        if found is not None:
            found.created = found.last_used = None
        await self.sync()
        await self.event(OpDone(host=self.host, model=name, op="delete"))

    def _require_entry(self, name: str) -> ModelInfo:
        info = self.entry(name)
        if info is None:
            raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not on {self.host}")
        return info
