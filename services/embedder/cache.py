"""The embedding cache: a NATS KV bucket every embedder replica shares.

Key: a hash of (model, truncate, dimensions, text), so a change to any of them is a miss. Value:
the vector as little-endian float32 bytes (3 KB for 768 dimensions; JSON floats would be ~6x that).
Entries expire after `embed_cache_ttl_s`, so a model re-pulled under the same name is picked up;
when the bucket is full the oldest entries go first.

The cache is best effort: a NATS hiccup is a miss (or an unstored vector), never a failed request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from array import array
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from contracts import subjects
from services.runtime import bus, cache_bucket
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.embedder")

_VERSION = b"v1\0"  # bump to orphan every entry if the value format changes
_SWAP = sys.byteorder == "big"


def cache_key(model: str, truncate: bool | None, dimensions: int | None, text: str) -> str:
    digest = hashlib.blake2b(_VERSION, digest_size=16)
    digest.update(f"{model}\0{truncate}\0{dimensions}\0".encode())
    digest.update(text.encode())
    return digest.hexdigest()


def to_bytes(vector: array[float]) -> bytes:
    if _SWAP:
        vector = array("f", vector)
        vector.byteswap()
    return vector.tobytes()


def from_bytes(data: bytes) -> array[float] | None:
    if not data or len(data) % 4:
        return None  # not ours: treat as a miss
    vector = array("f")
    vector.frombytes(data)
    if _SWAP:
        vector.byteswap()
    return vector


def cache_stream(settings: Settings) -> StreamConfig:
    """The cache bucket's stream: its oldest entries dropped when full (services/runtime/cache_bucket.py)."""
    return cache_bucket.cache_stream(
        subjects.EMBED_CACHE_BUCKET,
        ttl_s=settings.embed_cache_ttl_s,
        max_bytes=settings.embed_cache_max_bytes,
        replicas=settings.stream_replicas,
    )


class EmbedCache:
    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings
        self._kv: KeyValue | None = None
        self._warned = False

    async def start(self) -> None:
        """Creates the bucket if it is missing (idempotent, like every other provisioning)."""
        config = cache_stream(self.settings)
        await bus.ensure_stream(self.js, config)  # created if missing; `llmbus provision` updates it
        self._kv = await self.js.key_value(subjects.EMBED_CACHE_BUCKET)

    async def get_many(self, keys: Sequence[str]) -> list[array[float] | None]:
        return list(await asyncio.gather(*(self._get(key) for key in keys)))

    async def put_many(self, items: Sequence[tuple[str, array[float]]]) -> None:
        kv = self._kv
        if kv is None or not items:
            return
        puts = (kv.put(key, to_bytes(vector)) for key, vector in items)
        results = await asyncio.gather(*puts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._warn(f"{len(failed)} vectors not cached: {failed[0]!r}")

    async def _get(self, key: str) -> array[float] | None:
        if self._kv is None:
            return None
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            self._warn(f"cache lookup failed, embedding anyway: {exc!r}")
            return None
        return from_bytes(entry.value) if entry.value else None

    def _warn(self, message: str) -> None:
        # Once, then at debug: a NATS outage would otherwise log one line per input.
        log.log(logging.DEBUG if self._warned else logging.WARNING, message)
        self._warned = True
