"""The rule for every field of an API's request body: carried end to end, or refused with 400
`unsupported` naming it and why; never accepted and dropped (docs/contract.md has the table).

A body Struct declares each field of the API's schema. The ones llmbus cannot honour are listed
in its `REFUSED` (field -> why), with the values that ask for nothing in `NO_OP` (`n: 1`, `store:
false`): those pass, any other value is refused. tests/test_api_fields.py walks every field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from contracts import ErrorCode, LlmbusError
from contracts.tools import ToolCall, ToolCallFunction


def unsupported(field: str, why: str) -> LlmbusError:
    return LlmbusError(ErrorCode.UNSUPPORTED, f"`{field}` is not supported: {why}")


def bad(field: str, why: str) -> LlmbusError:
    return LlmbusError(ErrorCode.BAD_REQUEST, f"`{field}` {why}")


class Refusing:
    """A mixin for body Structs: `refuse()` raises for the first refused field given a value."""

    __slots__ = ()

    REFUSED: ClassVar[Mapping[str, str]] = {}
    NO_OP: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    def refuse(self) -> None:
        for name, why in self.REFUSED.items():
            value = getattr(self, name)
            if value is not None and value not in self.NO_OP.get(name, ()):
                raise unsupported(name, why)


def parse_arguments(arguments: str, where: str) -> dict[str, Any]:
    """OpenAI's `function.arguments` (a JSON string) as the object the bus carries."""
    try:
        value = json.loads(arguments)
    except ValueError:
        raise bad(where, "is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad(where, "must be a JSON object")
    return value


def tool_call(call_id: str, name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(id=call_id, function=ToolCallFunction(name=name, arguments=arguments))


def data_url_image(url: str, where: str) -> str:
    """A `data:image/...;base64,` URL's base64 payload, as the backend's `images` take it.

    A remote URL left here was not fetched (services/edge/image_fetch.py): the edge fetches only from
    the hosts an operator allows, so it is refused."""
    if url.startswith(("http://", "https://")):
        why = (
            "only `data:` URLs are taken (the edge fetches remote images only from LLMBUS_IMAGE_FETCH_HOSTS)"
        )
        raise unsupported(where, why)
    head, sep, payload = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise bad(where, "must be a `data:<type>;base64,` URL")
    try:
        base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise bad(where, "is not valid base64") from None
    return payload


def dumps(value: Any) -> str:
    """Arguments as OpenAI carries them (a JSON string)."""
    return msgspec.json.encode(value).decode()
