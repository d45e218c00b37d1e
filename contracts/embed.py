"""Embeddings on the bus: `EmbedRequest` on `llm.req.embed.<model>`, answered by `embeddings`.

A reply is the request's vectors in input order. It is usually one terminal `embeddings` event;
a reply too large for one NATS message is sent as `vectors` events (each with the input index of
its first vector) followed by `embeddings` with the rest, so a reader concatenates the
`embeddings` arrays of every event in `seq` order.

Vectors are float32: the JSON numbers are exactly the float32 values (widened to double), so an
answer from the cache and one from the model are identical.

The event structs stand alone (no shared base) so `contracts.messages` can put them in the `Event`
union without an import cycle.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from contracts.errors import ErrorCode, LlmbusError
from contracts.subjects import REQUEST_ID

Dimensions = Annotated[int, msgspec.Meta(gt=0, le=65_536, description="Vector size, if the model allows")]


class EmbedRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Embed one text or a list of texts with `model` (Ollama's `/api/embed` fields)."""

    id: str
    model: str
    input: str | list[str]
    truncate: bool | None = None  # cut inputs to the context length (the backend's default: true)
    dimensions: Dimensions | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input

    def validate(self) -> None:
        """Checks msgspec's types cannot express; raises `LlmbusError(bad_request)`."""
        from contracts.messages import validate_model  # messages imports this module

        if not REQUEST_ID.match(self.id):
            raise LlmbusError(ErrorCode.BAD_REQUEST, "id must be 8-128 characters of [A-Za-z0-9_-]")
        validate_model(self.model)
        if not self.inputs:
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`input` must not be empty")
        for index, text in enumerate(self.inputs):
            if not text:
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"`input[{index}]` is empty")

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


class Vectors(msgspec.Struct, tag_field="type", tag="vectors", kw_only=True, omit_defaults=True):
    """Part of a reply too large for one message: the vectors of inputs `index`, `index + 1`, ..."""

    seq: int
    attempt: int
    index: int
    embeddings: list[list[float]]


class Embeddings(msgspec.Struct, tag_field="type", tag="embeddings", kw_only=True, omit_defaults=True):
    """The terminal event of an embed request: the vectors from input `index` on, in input order.

    `index` is 0, and `embeddings` holds every vector, unless `vectors` events came first.
    """

    seq: int
    attempt: int
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
