"""What several seed dialects share: a token relay that resolves
`restart` (services/edge/compat/events.py)."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import Completion, Done, Error, Routed, Token
from services.edge.compat.events import Seamless
from services.edge.generation import collect
from services.edge.serve import Dialect, Source
from services.runtime.events import RawEvent

_encode = msgspec.json.Encoder().encode


class TextDialect(Dialect):
    """A seed API whose stream is its own JSON lines per token: `token`, `done` and `failed` say
    what each event becomes (b"" for nothing); a `restart` is resolved as the compat APIs do."""

    def __init__(self, model: str, *, streams: bool) -> None:
        self.model = model  # `routed` replaces it with the model that answers
        self.streams = streams
        self._events = Seamless()

    def frame(self, batch: list[RawEvent]) -> bytes:
        out: list[bytes] = []
        for event in self._events.events(batch):
            if isinstance(event, Token):
                out.append(self.token(event.text))
            elif isinstance(event, Routed):
                self.model = event.model
            elif isinstance(event, Done):
                out.append(self.done(event))
            elif isinstance(event, Error):
                out.append(self.failed(event))
            # `thinking` and `tool_call` have no place in a seed's shapes; its requests ask for neither.
        self.ended = self._events.ended
        return b"".join(out)

    def token(self, text: str) -> bytes:
        raise NotImplementedError

    def done(self, event: Done) -> bytes:
        return b""

    def failed(self, event: Error) -> bytes:
        """An error after the stream began: one `data:` line with the native error's fields."""
        return sse_data({"error": event.message, "code": event.code, "retry_after": event.retry_after})

    async def collect(self, source: Source) -> Completion | Error:
        return await collect(source, self.model)


def sse_data(value: Any) -> bytes:
    return b"data: " + _encode(value) + b"\n\n"
