"""How a request ended, read from its terminal event: decoded at most once, and only if asked.

The event feed keeps its terminal event as an `Outcome`; the tenant's ticket (tokens spent), the
request metrics and the `request finished` log line (outcome code) all read that one object.
"""

from __future__ import annotations

import msgspec

from contracts import ErrorCode

OK = "ok"


class _Usage(msgspec.Struct):
    total_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Terminal(msgspec.Struct):
    """What every terminal event (`done`, `embeddings`, `error`) and a classify reply may carry."""

    code: ErrorCode | None = None
    usage: _Usage | None = None


_decode_terminal = msgspec.json.Decoder(_Terminal).decode


class Outcome:
    """A request's terminal event: its outcome code (`ok` or an error code) and the tokens it used."""

    __slots__ = ("_terminal", "data", "type")

    def __init__(self, event_type: str, data: bytes) -> None:
        self.type = event_type
        self.data = data
        self._terminal: _Terminal | None = None

    def _decoded(self) -> _Terminal:
        if self._terminal is None:
            try:
                self._terminal = _decode_terminal(self.data)
            except msgspec.DecodeError:  # malformed (or an unknown code): counted as internal
                self._terminal = _Terminal(code=ErrorCode.INTERNAL if self.type == "error" else None)
        return self._terminal

    @property
    def code(self) -> str:
        if self.type != "error":
            return OK
        return str(self._decoded().code or ErrorCode.INTERNAL)

    @property
    def tokens(self) -> int:
        return spent(self._decoded().usage)


def spent_tokens(answer: bytes) -> int:
    """The tokens a terminal event or a classify reply reports in its `usage` (0 without one)."""
    try:
        return spent(_decode_terminal(answer).usage)
    except msgspec.DecodeError:
        return 0


def spent(usage: _Usage | None) -> int:
    return 0 if usage is None else usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
