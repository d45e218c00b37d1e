"""A nesting limit for every JSON request body, checked before anything decodes it.

msgspec's decoder (like any recursive one) raises `RecursionError` on a document nested about a
thousand levels deep, which would be a 500. Every body the edge reads passes through
`LimitedRequest.body`, so each API (native, OpenAI, Ollama, tasks) refuses one nested deeper than
`MAX_JSON_DEPTH` with `400 bad_request`, in its own error shape.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

from litestar import Request

from contracts import ErrorCode, LlmbusError

# Levels of arrays and objects, counting the body itself: far more than any real request needs
# (a JSON schema in `format`, tool definitions), far less than the decoder's recursion limit.
MAX_JSON_DEPTH = 100

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # brackets inside strings do not nest
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # everything but brackets: deleted
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body`'s arrays and objects nest more than `limit` levels; C-speed, one pass."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # too few brackets to nest that deep
    brackets = _STRING.sub(b"", body).translate(None, _BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


class LimitedRequest(Request[Any, Any, Any]):
    """The edge's request class: its body is refused if nested too deeply, before decoding."""

    async def body(self) -> bytes:
        body = await super().body()
        if too_deep(body):
            raise LlmbusError(
                ErrorCode.BAD_REQUEST, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep"
            )
        return body
