"""Turns one embed request into its answer: cache first, the batcher for the rest, one reply."""

from __future__ import annotations

import time
from array import array

from nats.aio.client import Client

from contracts import Embeddings, EmbedRequest, EmbedTimings, EmbedUsage, ErrorCode, LlmbusError, Vectors
from services.embedder.batcher import Batcher, Key
from services.embedder.cache import EmbedCache, cache_key
from services.runtime.settings import Settings
from services.runtime.worker_job import Job

# The most bytes one vector component takes in JSON: 24 characters and a comma.
_FLOAT_BYTES = 25
_ENVELOPE_BYTES = 4096  # room for everything in an event besides its vectors


class Embed:
    def __init__(self, nc: Client, batcher: Batcher, cache: EmbedCache | None, settings: Settings) -> None:
        self.nc = nc
        self.batcher = batcher
        self.cache = cache
        self.settings = settings

    async def __call__(self, job: Job[EmbedRequest]) -> None:
        request = job.request
        request.check_limits(self.settings.embed_max_inputs, self.settings.embed_max_input_chars)
        texts = request.inputs
        keys: list[str] = []
        vectors: list[array[float] | None] = [None] * len(texts)
        if self.cache is not None:
            keys = [cache_key(request.model, request.truncate, request.dimensions, text) for text in texts]
            vectors = await self.cache.get_many(keys)
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        cached = len(texts) - len(missing)
        tokens, backend_ms = 0, 0.0
        if missing:
            unique = list(dict.fromkeys(texts[i] for i in missing))  # a repeated text is embedded once
            part = await self.batcher.embed(Key(request.model, request.truncate, request.dimensions), unique)
            tokens, backend_ms = part.prompt_tokens, part.backend_ms
            by_text = dict(zip(unique, part.vectors, strict=True))
            for i in missing:
                vectors[i] = by_text[texts[i]]
            if self.cache is not None:
                # Stored before the answer, so a client that asks again at once gets a hit.
                await self.cache.put_many([(keys[i], by_text[texts[i]]) for i in missing])
        usage = EmbedUsage(prompt_tokens=tokens, cached=cached)
        await self._reply(job, [v.tolist() for v in vectors if v is not None], usage, backend_ms)

    async def _reply(
        self, job: Job[EmbedRequest], vectors: list[list[float]], usage: EmbedUsage, backend_ms: float
    ) -> None:
        """One `embeddings` event, preceded by `vectors` events when it would not fit one message."""
        budget = self.nc.max_payload - _ENVELOPE_BYTES
        sizes = [len(vector) * _FLOAT_BYTES for vector in vectors]
        if max(sizes) > budget:
            raise LlmbusError(  # what the client asked for is too big to carry: its error, not ours
                ErrorCode.REQUEST_TOO_LARGE,
                f"a vector of {max(sizes) // _FLOAT_BYTES} dimensions does not fit a NATS message "
                f"({self.nc.max_payload} bytes); ask for fewer `dimensions`",
            )
        start = used = 0
        for i, size in enumerate(sizes):
            if used + size > budget:
                await job.emit(
                    Vectors(seq=job.seq, attempt=job.attempt, index=start, embeddings=vectors[start:i])
                )
                start, used = i, 0
            used += size
        total_ms = (time.perf_counter() - job.started) * 1000
        await job.emit(
            Embeddings(
                seq=job.seq,
                attempt=job.attempt,
                model=job.request.model,
                index=start,
                embeddings=vectors[start:],
                usage=usage,
                timings=EmbedTimings(total_ms=round(total_ms, 3), backend_ms=round(backend_ms, 3)),
            )
        )
