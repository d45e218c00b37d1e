"""The events a compat stream forwards: tokens and the terminal event, with `restart` resolved.

OpenAI's and Ollama's stream formats cannot take text back, so a `restart` (a prompt request
started over after a worker crash, see docs/reliability.md) cannot be passed on. Instead the new
attempt's text is checked against the text the client already has: while it repeats it, nothing
is sent; once it goes past it, the rest streams on, so the client sees one seamless answer. If it
differs (a sampled answer usually does), the stream ends with `backend_error` and the request is
cancelled: the client knows to retry, and never gets a duplicated or spliced answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from contracts import Done, Error, ErrorCode, Event, Restart, Routed, Token
from services.edge.dispatch import EventFeed

_decode_event = msgspec.json.Decoder(Event).decode

DIVERGED = (
    "a worker failed mid-answer and the model's new attempt differs from the text already streamed; "
    "retry the request"
)


async def stream_events(feed: EventFeed) -> AsyncIterator[Token | Routed | Done | Error]:
    """`Routed` (for `auto`: the model that answers), `Token`s, then one `Done` or `Error`."""
    sent: list[str] = []  # what the client has, in case a restart makes us check a new attempt
    check: str | None = None  # while a new attempt repeats the sent text: that text
    at = 0  # how far into `check` the new attempt has come
    async for batch in feed.batches():
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Token):
                if check is None:
                    sent.append(event.text)
                    yield event
                    continue
                text = event.text
                if at + len(text) <= len(check):
                    if not check.startswith(text, at):
                        yield _diverged(event)
                        return
                    at += len(text)
                    continue
                overlap = len(check) - at
                if not text.startswith(check[at:]):
                    yield _diverged(event)
                    return
                check = None  # past the text the client has: the rest is new
                sent.append(text[overlap:])
                yield msgspec.structs.replace(event, text=text[overlap:])
            elif isinstance(event, Routed):
                yield event
            elif isinstance(event, Restart):
                check, at = (check if check is not None else "".join(sent)), 0
            elif isinstance(event, Done):
                if check is not None and at != len(check):
                    yield _diverged(event)  # the new answer is shorter than what was sent
                else:
                    yield event
                return
            elif isinstance(event, Error):
                yield event
                return


def _diverged(event: Token | Done) -> Error:
    return Error(seq=event.seq, attempt=event.attempt, code=ErrorCode.BACKEND_ERROR, message=DIVERGED)
