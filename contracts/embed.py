"""Embeddings on the bus: `EmbedRequest` on `llm.req.embed.<model>`, answered by `embeddings`.

A reply is the request's vectors in input order. It is usually one terminal `embeddings` event;
a reply too large for one NATS message is sent as `vectors` events (each with the input index of
its first vector) followed by `embeddings` with the rest, so a reader concatenates the
`embeddings` arrays of every event in `seq` order.

Vectors are float32: the JSON numbers are exactly the float32 values (widened to double), so an
answer from the cache and one from the model are identical.

Its events share `contracts.base.EventBase` with every other event (`contracts.messages` puts them
in the `Event` union).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from contracts.base import EventBase, ModelName, RequestId, bad_request, check_id, validate_model
from contracts.errors import ErrorCode, LlmbusError

Dimensions = Annotated[int, msgspec.Meta(gt=0, le=65_536, description="Vector size, if the model allows")]


class EmbedRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Embed one text or a list of texts with `model` (Ollama's `/api/embed` fields)."""

    id: RequestId
    model: ModelName
    input: str | list[str]
    truncate: bool | None = None  # cut inputs to the context length (the backend's default: true)
    dimensions: Dimensions | None = None

    def __post_init__(self) -> None:
        """Every input has text (`bad_request`), on decode and on construction."""
        if not self.inputs:
            raise bad_request("`input` must not be empty")
        for index, text in enumerate(self.inputs):
            if not text:
                raise bad_request(f"`input[{index}]` is empty")

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input

    def validate(self) -> None:
        """The typed rules (`RequestId`, `ModelName`) for a request built in code, not decoded."""
        check_id(self.id)
        validate_model(self.model)

    def check_limits(self, max_inputs: int, max_input_chars: int) -> None:
        """The operator's limits: too many inputs is `request_too_large`, a long one `prompt_too_large`."""
        inputs = self.inputs
        if len(inputs) > max_inputs:
            raise LlmbusError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"{len(inputs)} inputs in one request; at most {max_inputs} are allowed, split them up",
            )
        for index, text in enumerate(inputs):
            if len(text) > max_input_chars:
                raise LlmbusError(
                    ErrorCode.PROMPT_TOO_LARGE,
                    f"`input[{index}]` has {len(text)} characters; at most {max_input_chars} are allowed "
                    "per input, split the text into chunks",
                )


class EmbedUsage(msgspec.Struct):
    # Tokens the backend evaluated for this request's inputs. When requests share one backend call
    # its count is split between them in proportion to their characters.
    prompt_tokens: int
    cached: int  # inputs answered from the cache: they cost no backend tokens


class EmbedTimings(msgspec.Struct):
    total_ms: float  # from the embedder taking the request to its answer
    backend_ms: float  # backend calls that carried this request's inputs (0: all from the cache)


class Vectors(EventBase, tag="vectors"):
    """Part of a reply too large for one message: the vectors of inputs `index`, `index + 1`, ..."""

    index: int
    embeddings: list[list[float]]


class Embeddings(EventBase, tag="embeddings"):
    """The terminal event of an embed request: the vectors from input `index` on, in input order.

    `index` is 0, and `embeddings` holds every vector, unless `vectors` events came first.
    """

    model: str
    embeddings: list[list[float]]
    usage: EmbedUsage
    timings: EmbedTimings
    index: int = 0


class EmbedResponse(msgspec.Struct):
    """The HTTP answer of `POST /v1/embed`."""

    request_id: str
    model: str
    embeddings: list[list[float]]
    usage: EmbedUsage
    timings: EmbedTimings
