"""What a generation asked and answered, for the ledger (`LLMBUS_LEDGER_CONTENT=on` only).

The worker that ends a request already publishes its usage event; with content on, the generator's
jobs are `RecordingJob`s, which keep the answer's text as they stream it and put it, with the
prompt, on that event (`UsageEvent.content`). The ledger gets the whole answer in one message,
without reading `LLM_OUT` back. With content off the generator uses plain `Job`s: nothing is added
to the per-token path.

An answer that took a worker over after a crash starts from what the earlier attempt delivered
(`prior_text`); a `restart` voids it, as it does for the client. Each field is cut to `max_bytes`
of UTF-8; what is kept while streaming stops growing past that, so a runaway answer costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from contracts import TERMINAL_EVENTS, Event, GenerateRequest, Restart, Token
from contracts.models import UsageContent
from services.runtime.settings import Settings
from services.runtime.worker_job import Job

_encode = msgspec.json.Encoder().encode


class RecordingJob(Job[GenerateRequest]):
    __slots__ = ("_kept", "_parts", "max_bytes", "recorded")

    def __init__(self, *args: Any, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        self._parts: list[str] | None = None  # None: `prior_text` not taken yet (set after __init__)
        self._kept = 0  # characters in `_parts`; a UTF-8 character is at most 4 bytes
        self.recorded: UsageContent | None = None  # read by services/runtime/usage.py

    def _keep(self, text: str) -> None:
        if self._parts is None:
            self._parts = [self.prior_text] if self.prior_text else []
            self._kept = len(self.prior_text)
        if self._kept <= self.max_bytes:
            self._parts.append(text)
            self._kept += len(text)

    async def token(self, text: str) -> None:
        self._keep(text)
        await super().token(text)

    async def emit(self, event: Event) -> None:
        if isinstance(event, Token):  # scored tokens (logprobs) come this way
            self._keep(event.text)
        elif isinstance(event, Restart):
            self._parts, self._kept = [], 0
        elif isinstance(event, TERMINAL_EVENTS) and not self.terminal:
            self._keep("")
            self.recorded = content(self.request, "".join(self._parts or ()), self.max_bytes)
        await super().emit(event)


def recording_jobs(settings: Settings) -> Callable[..., Job[GenerateRequest]] | None:
    """The generator's job factory: recording with content on, None (plain jobs) otherwise."""
    if settings.ledger_content != "on":
        return None
    limit = max(0, settings.ledger_content_max_bytes)

    def make(*args: Any, **kwargs: Any) -> Job[GenerateRequest]:
        return RecordingJob(*args, max_bytes=limit, **kwargs)

    return make


def content(request: GenerateRequest, answer: str, max_bytes: int) -> UsageContent:
    prompt, cut_prompt = _cut(_encode(prompt_of(request)).decode(), max_bytes)
    answer, cut_answer = _cut(answer, max_bytes)
    return UsageContent(prompt=prompt, answer=answer, truncated=cut_prompt or cut_answer)


def prompt_of(request: GenerateRequest) -> list[dict[str, Any]]:
    """The messages the model read, images replaced by their count (they are not text to keep)."""
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": request.system})
    if request.messages is None:
        user: dict[str, Any] = {"role": "user", "content": request.prompt or ""}
        if request.images:
            user["images"] = len(request.images)
        return [*out, user]
    for message in request.messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.images:
            item["images"] = len(message.images)
        if message.tool_calls:
            item["tool_calls"] = [msgspec.to_builtins(call.function) for call in message.tool_calls]
        out.append(item)
    return out


def _cut(text: str, max_bytes: int) -> tuple[str, bool]:
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    return data[:max_bytes].decode(errors="ignore"), True
