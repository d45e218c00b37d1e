"""Decoded events of a feed, for adapters that re-shape every event anyway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from contracts import Event
from services.edge.dispatch import EventFeed

_decode_event = msgspec.json.Decoder(Event).decode


async def events(feed: EventFeed) -> AsyncIterator[Event]:
    async for batch in feed.batches():
        for _, data in batch:
            yield _decode_event(data)
