"""Server-Sent Events framing of bus events.

The worker's JSON payload is the SSE `data:` as is; the event type and `seq` (the SSE `id:`, which
a client sends back as `Last-Event-ID` to resume) come from the decoded head.
"""

from __future__ import annotations

from collections.abc import Iterable

from contracts import EventHead


def frame(events: Iterable[tuple[EventHead, bytes]]) -> bytes:
    parts: list[bytes] = []
    for head, data in events:
        if head.seq >= 0:
            parts.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (head.seq, head.type.encode(), data))
        else:  # produced by the edge itself (its deadline): not part of the replayable sequence
            parts.append(b"event: %s\ndata: %s\n\n" % (head.type.encode(), data))
    return b"".join(parts)
