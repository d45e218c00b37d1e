"""The events a compat stream forwards: tokens and the terminal event, with `restart` resolved.

OpenAI's and Ollama's stream formats cannot take text back, so a `restart` (a prompt request
started over after a worker crash, see docs/reliability.md) cannot be passed on. Instead the new
attempt's text is checked against the text the client already has: while it repeats it, nothing
is sent; once it goes past it, the rest streams on, so the client sees one seamless answer. If it
differs (a sampled answer usually does), the stream ends with `backend_error` and the request is
cancelled: the client knows to retry, and never gets a duplicated or spliced answer.
"""

from __future__ import annotations

import msgspec

from contracts import Done, Error, ErrorCode, Event, Restart, Routed, Token
from contracts.messages import Thinking, ToolCallEvent
from services.runtime.events import RawEvent

_decode_event = msgspec.json.Decoder(Event).decode

DIVERGED = (
    "a worker failed mid-answer and the model's new attempt differs from the text already streamed; "
    "retry the request"
)

Forwarded = Token | Thinking | ToolCallEvent | Routed | Done | Error


class Seamless:
    """One request's events as a compat stream forwards them, a batch at a time: `Routed` (for
    `auto`: the model that answers), `Thinking`, `Token`s and `ToolCallEvent`s, then one `Done` or
    `Error`, after which `ended`. A new attempt's thinking is not forwarded while its text is
    checked: the client has the reasoning that led to the text it has."""

    __slots__ = ("_at", "_check", "_sent", "ended")

    def __init__(self) -> None:
        self._sent: list[str] = []  # what the client has, in case a restart makes us check a new attempt
        self._check: str | None = None  # while a new attempt repeats the sent text: that text
        self._at = 0  # how far into `check` the new attempt has come
        self.ended = False

    def events(self, batch: list[RawEvent]) -> list[Forwarded]:
        out: list[Forwarded] = []
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Token):
                if self._check is None:
                    self._sent.append(event.text)
                    out.append(event)
                elif (token := self._continued(event)) is not None:
                    out.append(token)
            elif isinstance(event, Thinking):
                if self._check is None:
                    out.append(event)
            elif isinstance(event, (Routed, ToolCallEvent)):  # a call is in chat answers (never restarted)
                out.append(event)
            elif isinstance(event, Restart):
                self._check, self._at = (self._check if self._check is not None else "".join(self._sent)), 0
            elif isinstance(event, Done):
                if self._check is not None and self._at != len(self._check):
                    self._end(out, _diverged(event))  # the new answer is shorter than what was sent
                else:
                    self._end(out, event)
            elif isinstance(event, Error):
                self._end(out, event)
            if self.ended:
                break
        return out

    def _continued(self, event: Token) -> Forwarded | None:
        """A token of a new attempt: nothing while it repeats the sent text, then the new part;
        an error (and the end) as soon as it differs."""
        check = self._check
        assert check is not None
        text = event.text
        if self._at + len(text) <= len(check):
            if not check.startswith(text, self._at):
                self.ended = True
                return _diverged(event)
            self._at += len(text)
            return None
        overlap = len(check) - self._at
        if not text.startswith(check[self._at :]):
            self.ended = True
            return _diverged(event)
        self._check = None  # past the text the client has: the rest is new
        self._sent.append(text[overlap:])
        return msgspec.structs.replace(event, text=text[overlap:])

    def _end(self, out: list[Forwarded], event: Done | Error) -> None:
        out.append(event)
        self.ended = True


def _diverged(event: Token | Done) -> Error:
    return Error(seq=event.seq, attempt=event.attempt, code=ErrorCode.BACKEND_ERROR, message=DIVERGED)
