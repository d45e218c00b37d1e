"""What a worker needs from a model server, whatever API it speaks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import httpx
import msgspec

from contracts import ErrorCode, GenerateRequest, LlmbusError, Logprob, ToolCall


class Final(msgspec.Struct):
    """The last item of a generation stream: why it stopped and what it cost."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float | None = None
    model: str | None = None  # the model that answered, as the server names it (gen_ai.response.model)


class Scored(msgspec.Struct):
    """Answer text with its tokens' log probabilities (only when the request asked for them)."""

    text: str
    logprobs: list[Logprob]


class Thought(msgspec.Struct):
    """Reasoning text: streamed apart from the answer, never mixed into it."""

    text: str


# What a generation streams: answer text (plain, or `Scored`), `Thought`s, complete `ToolCall`s
# (the id may be empty: the generator names it), then one `Final`.
Piece = str | Scored | Thought | ToolCall | Final


def unsupported(field: str, why: str) -> LlmbusError:
    """A request field this backend or model cannot honour: refused, never dropped."""
    return LlmbusError(ErrorCode.UNSUPPORTED, f"`{field}` is not supported here: {why}")


class EmbedResult(msgspec.Struct):
    """One embedding call's answer: a vector per input, in input order, and the tokens it cost."""

    vectors: list[list[float]]
    prompt_tokens: int


class Backend(Protocol):
    url: str

    def generate(self, request: GenerateRequest) -> AsyncIterator[Piece]:
        """Streams pieces (see `Piece`), then exactly one `Final`.

        Raises `LlmbusError` with a stable code. Closing the iterator (or cancelling the task that
        drives it) closes the upstream HTTP response, so the server stops generating.
        """
        ...

    async def embed(
        self, model: str, inputs: list[str], *, truncate: bool | None = None, dimensions: int | None = None
    ) -> EmbedResult:
        """Embeds `inputs` in one call; `None` options are left to the server's defaults.

        Raises `LlmbusError` with a stable code; `bad_request` or `backend_error` may be caused by a
        single input (a text over the context length with `truncate=False`).
        """
        ...

    async def version(self) -> str:
        """A cheap reachability probe; raises `LlmbusError(backend_unavailable)`."""
        ...

    async def aclose(self) -> None: ...


@contextlib.contextmanager
def http_failures(url: str, what: str) -> Iterator[None]:
    """A backend call's transport failures as llmbus errors, the same for every backend: no
    connection is `backend_unavailable` (retried), anything else `backend_error`."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, f"cannot reach the model backend at {url}") from exc
    except (httpx.HTTPError, msgspec.DecodeError) as exc:
        raise LlmbusError(ErrorCode.BACKEND_ERROR, f"{what} failed: {exc!r}") from exc
