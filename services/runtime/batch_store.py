"""Files and batches on NATS: contents in Object Store `llm_files`, records in KV `llm_batches`,
finished lines in KV `llm_batch_lines`, batches to run in the work queue `LLM_BATCH`.

Shared by the edge (the HTTP API, services/edge/compat/openai_batches.py) and `llmbus batcher`
(services/batcher/). Every record names its tenant; a lookup by another tenant is `not_found`.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from contracts import ErrorCode, LlmbusError, headers
from contracts.batches import (
    BATCH_STREAM,
    BATCH_SUBJECT,
    BATCHES_BUCKET,
    FILES_BUCKET,
    LINES_BUCKET,
    Batch,
    FileObject,
    LineResult,
)
from services.runtime import bus
from services.runtime.settings import Settings

_encode = msgspec.json.Encoder().encode
_decode_file = msgspec.json.Decoder(FileObject).decode
_decode_batch = msgspec.json.Decoder(Batch).decode
_decode_line = msgspec.json.Decoder(LineResult).decode

T = TypeVar("T")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # what a KV key part may be; anything else: not found
RETENTION_S = 30 * 24 * 3600  # batch records and files are kept this long (OpenAI: 30 days)


def _expired(record: FileObject) -> bool:
    return record.expires_at is not None and record.expires_at <= time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class BatchStore:
    def __init__(self, js: JetStreamContext, records: KeyValue, lines: KeyValue, files: ObjectStore) -> None:
        self.js = js
        self.records = records
        self.lines = lines
        self.files = files

    @classmethod
    async def open(cls, js: JetStreamContext, settings: Settings) -> BatchStore:
        """The buckets and the work queue, created by whichever of the edge or a batcher comes first."""
        replicas = settings.stream_replicas
        records = await bus.key_value(
            js,
            KeyValueConfig(
                bucket=BATCHES_BUCKET, history=1, storage=StorageType.FILE, ttl=RETENTION_S, replicas=replicas
            ),
        )
        lines = await bus.key_value(
            js,
            KeyValueConfig(
                bucket=LINES_BUCKET, history=1, storage=StorageType.FILE, ttl=RETENTION_S, replicas=replicas
            ),
        )
        try:
            files = await js.object_store(FILES_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            files = await js.create_object_store(
                FILES_BUCKET,
                ObjectStoreConfig(storage=StorageType.FILE, ttl=RETENTION_S, replicas=replicas),
            )
        try:
            await js.stream_info(BATCH_STREAM)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=BATCH_STREAM,
                    subjects=[BATCH_SUBJECT],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                    num_replicas=replicas,
                )
            )
        return cls(js, records, lines, files)

    # Files

    async def put_file(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        data: bytes,
        file_id: str = "",
        *,
        expires_s: int | None = None,
    ) -> FileObject:
        now = int(time.time())
        record = FileObject(
            id=file_id or new_id("file"),
            bytes=len(data),
            created_at=now,
            filename=filename,
            purpose=purpose,
            expires_at=now + (expires_s or RETENTION_S),
            tenant=tenant,
        )
        await self.files.put(record.id, data)
        await self.records.put(f"file.{record.id}", _encode(record))
        return record

    async def file(self, file_id: str, tenant: str) -> FileObject:
        record = await self._get(f"file.{file_id}", _decode_file) if _ID.match(file_id) else None
        if record is not None and _expired(record):
            await self._drop_file(file_id)
            record = None
        if record is None or record.tenant != tenant:
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no file {file_id}")
        return record

    async def files_of(self, tenant: str) -> list[FileObject]:
        """The tenant's files (not expired), newest first."""
        found = map(_decode_file, (await self._values(self.records, "file.*")).values())
        mine = [record for record in found if record.tenant == tenant and not _expired(record)]
        return sorted(mine, key=lambda record: (record.created_at, record.id), reverse=True)

    async def sweep_files(self) -> int:
        """Deletes every file past its `expires_at` (a lookup also refuses one); how many."""
        expired = [
            record
            for record in map(_decode_file, (await self._values(self.records, "file.*")).values())
            if _expired(record)
        ]
        for record in expired:
            await self._drop_file(record.id)
        return len(expired)

    async def _drop_file(self, file_id: str) -> None:
        with contextlib.suppress(ObjectNotFoundError):
            await self.files.delete(file_id)
        with contextlib.suppress(KeyNotFoundError):
            await self.records.delete(f"file.{file_id}")

    async def content(self, file_id: str, tenant: str) -> bytes:
        await self.file(file_id, tenant)
        try:
            result = await self.files.get(file_id)
        except ObjectNotFoundError as exc:
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no file {file_id}") from exc
        return result.data or b""

    async def delete_file(self, file_id: str, tenant: str) -> None:
        await self.file(file_id, tenant)
        await self._drop_file(file_id)

    # Batches

    async def create_batch(self, batch: Batch) -> None:
        await self.records.create(f"batch.{batch.id}", _encode(batch))
        # The work queue's message id is the batch's: a retried create enqueues it once.
        await self.js.publish(BATCH_SUBJECT, batch.id.encode(), headers={headers.MSG_ID: batch.id})

    async def batch(self, batch_id: str, tenant: str | None = None) -> Batch:
        """The batch; with `tenant`, only that tenant's (else `not_found`)."""
        record = await self._get(f"batch.{batch_id}", _decode_batch) if _ID.match(batch_id) else None
        if record is None or (tenant is not None and record.tenant != tenant):
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no batch {batch_id}")
        return record

    async def batches(self, tenant: str) -> list[Batch]:
        """The tenant's batches, newest first."""
        found = [_decode_batch(value) for value in (await self._values(self.records, "batch.*")).values()]
        mine = [batch for batch in found if batch.tenant == tenant]
        return sorted(mine, key=lambda batch: (batch.created_at, batch.id), reverse=True)

    async def update_batch(self, batch_id: str, change: Callable[[Batch], Batch | None]) -> Batch:
        """Read-change-write with the record's revision, so the edge's cancel and the batcher's
        progress never overwrite each other. `change` returning None leaves it as it is."""
        key = f"batch.{batch_id}"
        while True:
            entry = await self.records.get(key)
            assert entry.value is not None
            current = _decode_batch(entry.value)
            changed = change(current)
            if changed is None:
                return current
            try:
                await self.records.update(key, _encode(changed), last=entry.revision)
                return changed
            except KeyWrongLastSequenceError:
                continue

    # Finished lines

    async def put_line(self, batch_id: str, index: int, result: LineResult) -> None:
        await self.lines.put(f"{batch_id}.{index}", _encode(result))

    async def finished_lines(self, batch_id: str) -> dict[int, LineResult]:
        """Every line of the batch finished so far (after a restart: where to resume)."""
        values = await self._values(self.lines, f"{batch_id}.*")
        return {int(key.rsplit(".", 1)[1]): _decode_line(value) for key, value in values.items()}

    async def _values(self, bucket: KeyValue, keys: str) -> dict[str, bytes]:
        """Every stored value under `keys` (a subject pattern). The stream lists the keys it holds and
        each is read by a direct get: a KV watch can say "no more" before its first value when the
        bucket is busy, which listed a tenant's batches as none."""
        name = bucket._name  # nats-py keeps the bucket's name only here
        prefix = f"$KV.{name}."
        info = await self.js.stream_info(f"KV_{name}", subjects_filter=prefix + keys)
        found: dict[str, bytes] = {}
        for subject in info.state.subjects or {}:
            key = subject.removeprefix(prefix)
            with contextlib.suppress(KeyNotFoundError):
                entry = await bucket.get(key)
                if entry.value:
                    found[key] = entry.value
        return found

    async def _get(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        try:
            entry = await self.records.get(key)
        except KeyNotFoundError:
            return None
        return decode(entry.value) if entry.value else None
