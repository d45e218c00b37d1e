"""Turns one generation request into start, token... and done events."""

from __future__ import annotations

import time

from contracts import GenerateRequest, Timings, Usage
from services.runtime.backends import Backend, Final
from services.runtime.worker import Job


class Generate:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def __call__(self, job: Job[GenerateRequest]) -> None:
        request = job.request
        await job.start(request.model)
        first_token_at: float | None = None
        final: Final | None = None
        async for piece in self.backend.generate(request):
            if isinstance(piece, Final):
                final = piece
                break
            if first_token_at is None:
                first_token_at = time.perf_counter()
            await job.token(piece)
        assert final is not None  # the backend protocol ends every stream with one Final
        now = time.perf_counter()
        await job.done(
            final.finish_reason,
            Usage(
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                total_tokens=final.prompt_tokens + final.completion_tokens,
            ),
            Timings(
                total_ms=round((now - job.started) * 1000, 3),
                ttft_ms=None if first_token_at is None else round((first_token_at - job.started) * 1000, 3),
                tokens_per_s=None if final.tokens_per_s is None else round(final.tokens_per_s, 2),
            ),
        )
