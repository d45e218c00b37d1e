"""The semantic cache: a question close enough to one answered before gets that answer.

Opt-in (`Llmbus-Cache: semantic`, the body's `"cache": "semantic"`, a tenant's `cache`, or
`LLMBUS_RESPONSE_CACHE=semantic`), and only where sharing an answer is safe: same tenant, same
model and every other field equal (the request's *scope*: its hash with the texts blanked), no
tools, no images, `temperature: 0` (unless forced with `force`). The question's text is embedded by
the embedder over the bus (`LLMBUS_SEMANTIC_EMBED_MODEL`); a stored vector of the same scope with
cosine similarity at least `LLMBUS_SEMANTIC_THRESHOLD` (0.95) points at the answer to replay.

Vectors live in the response cache's bucket (`v.<tenant>.<digest>`, beside the answers they point
at, so they share its TTL and byte bound) and every edge keeps them in memory by a KV watch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Self

import msgspec
import numpy as np
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from contracts import Embeddings, EmbedRequest, Error, Event, GenerateRequest, LlmbusError, subjects
from services.edge.cache_store import CacheStore, Entry, Plan, tenant_tag
from services.runtime.kv_view import KVView
from services.runtime.settings import Settings

if TYPE_CHECKING:
    from services.edge.dispatch import Dispatcher

log = logging.getLogger("llmbus.edge")

EMBED_TIMEOUT_S = 2.0  # a semantic lookup waits this long for the embedder, then is a miss ...
EMBED_PAUSE_S = 30.0  # ... and lookups skip the embedder this long (none may be running)
_canonical = msgspec.json.Encoder(order="sorted").encode
_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(Event).decode


class Vector(msgspec.Struct):
    stored_at: float
    scope: str
    answer: str  # the answer's key (`x.<tenant>.<digest>`)
    vector: bytes  # float32, unit length


_decode_vector = msgspec.json.Decoder(Vector).decode


def semantic_text(request: GenerateRequest) -> str:
    """What the question says: the system text, every message's role and content, or the prompt."""
    parts = [request.system or ""]
    parts += [f"{m.role}: {m.content}" for m in request.messages or ()]
    parts.append(request.prompt or "")
    return "\n".join(part for part in parts if part)


def semantic_scope(request: GenerateRequest, tenant: str) -> str:
    """Everything but the texts (model, options, format, the messages' roles, ...), hashed."""
    blank = msgspec.structs.replace(
        request,
        id="-",
        system=None,
        prompt="" if request.prompt is not None else None,
        messages=[msgspec.structs.replace(m, content="") for m in request.messages]
        if request.messages is not None
        else None,
    )
    return hashlib.blake2b(tenant.encode() + b"\0" + _canonical(blank), digest_size=12).hexdigest()


class SemanticCache(KVView):
    def __init__(self, store: CacheStore, settings: Settings) -> None:
        super().__init__()
        self.store = store
        self.model = settings.semantic_embed_model
        self.threshold = settings.semantic_threshold
        self.ttl_s = settings.response_cache_ttl_s
        self.vectors: dict[str, tuple[str, Vector, np.ndarray]] = {}  # key -> (tenant tag, entry, vector)
        self._paused_until = 0.0  # the embedder failed: no semantic lookups until then

    async def open(self, js: JetStreamContext) -> KeyValue:
        assert self.store.kv is not None
        return self.store.kv

    async def start(self, js: JetStreamContext) -> Self:
        """Watches the vectors only (`v.>`), never the answers."""
        import asyncio

        self._watcher = await (await self.open(js)).watch("v.>")
        self._task = asyncio.create_task(self._follow())
        return self

    def put(self, key: str, value: bytes) -> None:
        try:
            entry = _decode_vector(value)
        except msgspec.DecodeError:
            return
        vector = np.frombuffer(entry.vector, dtype="<f4")
        self.vectors[key] = (key.split(".")[1], entry, vector)

    def delete(self, key: str) -> None:
        self.vectors.pop(key, None)

    async def find(self, dispatcher: Dispatcher, plan: Plan) -> Entry | None:
        """The stored answer of the closest question in the plan's scope, if close enough."""
        tag, now = tenant_tag(plan.tenant), time.time()
        # Expired vectors go here: a watch hears neither a purge nor what the bucket's limits drop.
        for key in [key for key, (_, entry, _) in self.vectors.items() if now - entry.stored_at > self.ttl_s]:
            del self.vectors[key]
        candidates = [
            (key, entry, vector)
            for key, (owner, entry, vector) in self.vectors.items()
            if owner == tag and entry.scope == plan.scope
        ]
        plan.vector = await self._embed(dispatcher, plan.text)
        if plan.vector is None or not candidates:
            return None
        scores = np.stack([vector for _, _, vector in candidates]) @ plan.vector
        best = int(np.argmax(scores))
        if float(scores[best]) < self.threshold:
            return None
        key, entry, _ = candidates[best]
        answer = await self.store.get(entry.answer)
        if answer is None:  # dropped from the bucket (LRU, TTL, a purge): forget its vector too
            self.vectors.pop(key, None)
        return answer

    async def add(self, plan: Plan) -> None:
        if plan.vector is None:
            return
        vector = Vector(time.time(), plan.scope, plan.key, plan.vector.astype("<f4").tobytes())
        await self.store.put_raw("v." + plan.key.removeprefix("x."), _encode(vector))

    async def _embed(self, dispatcher: Dispatcher, text: str) -> np.ndarray | None:
        """The text's unit vector from the embedder (None when it cannot answer: a plain miss)."""
        if time.monotonic() < self._paused_until:
            return None
        vector = await self._ask_embedder(dispatcher, text)
        if vector is None:
            self._paused_until = time.monotonic() + EMBED_PAUSE_S
        return vector

    async def _ask_embedder(self, dispatcher: Dispatcher, text: str) -> np.ndarray | None:
        request = EmbedRequest(id="cache-" + uuid.uuid4().hex, model=self.model, input=[text])
        try:
            feed = await dispatcher.submit(
                request, EMBED_TIMEOUT_S, subject=subjects.embed_subject(self.model)
            )
        except LlmbusError as exc:
            log.warning("semantic cache: cannot embed (%s): %s", exc.code, exc)
            return None
        try:
            async with asyncio.timeout(EMBED_TIMEOUT_S):
                async for batch in feed.batches():
                    for _, data in batch:
                        event = _decode_event(data)
                        if isinstance(event, Embeddings) and event.embeddings:
                            vector = np.asarray(event.embeddings[0], dtype=np.float32)
                            norm = float(np.linalg.norm(vector))
                            return vector / norm if norm else None
                        if isinstance(event, Error):
                            log.warning("semantic cache: cannot embed (%s): %s", event.code, event.message)
                            return None
        except TimeoutError:
            log.warning(
                "semantic cache: no embedding within %ss; exact matches only for %ss",
                EMBED_TIMEOUT_S,
                EMBED_PAUSE_S,
            )
        finally:
            feed.close()  # cancels an unanswered request
        return None
