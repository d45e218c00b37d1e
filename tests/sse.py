"""A small SSE parser for tests: what a browser's EventSource would see."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class SseEvent:
    event: str
    data: Any
    id: str | None


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    event, data, event_id = "message", [], None
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield SseEvent(event, json.loads("\n".join(data)), event_id)
            event, data, event_id = "message", [], None
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line.startswith("id:"):
            event_id = line[3:].strip()


async def collect(response: httpx.Response) -> list[SseEvent]:
    return [event async for event in sse_events(response)]
