"""Reading a request's events back from `LLM_OUT`, and putting them in order.

Two readers need "what has this request published so far": a worker that takes over a request
after a crash (to continue after it, or to see it already ended) and the edge (to replay from
`Last-Event-ID`, to re-attach an idempotent retry, and to fill a gap in a live feed). Both use
`read` (batched direct gets: one request, many answers, served by any replica) and a `Sequencer`,
so both see the same answer.

Ordering rules of a `Sequencer`, the one place they live: events are delivered in `seq` order,
each `seq` once (the first copy wins; a repeat, such as a retried publish or a replayed event
already sent live, is dropped), and a gap (a `seq` not seen yet) holds later events back until it
is filled or `skip_gap` gives up on it. A terminal event at or before the reader's starting point
(`after`: a client resuming at or past the end) ends the sequence with nothing delivered. A
worker that takes over a request continues after the highest `seq` stored, gaps skipped
(`published`), so two attempts never publish the same `seq`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import TERMINAL_TYPES, EventHead, Thinking, Token, ToolCall, ToolCallEvent, subjects

_decode_head = msgspec.json.Decoder(EventHead).decode
_decode_token = msgspec.json.Decoder(Token).decode
_decode_thinking = msgspec.json.Decoder(Thinking).decode
_decode_tool_call = msgspec.json.Decoder(ToolCallEvent).decode

RawEvent = tuple[EventHead, bytes]

_DIRECT_GET = "$JS.API.DIRECT.GET." + subjects.EVENT_STREAM
_BATCH = 256


class Sequencer:
    """Puts events of one request in order; see the module docstring for the rules."""

    __slots__ = ("_after", "_held", "ended", "next")

    def __init__(self, after: int = -1) -> None:
        self._after = after  # the reader already has every event up to this seq
        self.next = after + 1  # the seq to deliver next
        self.ended = False  # a terminal event was delivered
        self._held: dict[int, RawEvent] = {}

    @property
    def gap(self) -> bool:
        return bool(self._held)

    def offer(self, head: EventHead, data: bytes, out: list[RawEvent]) -> None:
        """Takes one event; appends to `out` the events that are now deliverable, in order."""
        if self.ended:
            return
        if head.seq == self.next and not self._held:
            self._deliver(head)  # the hot path: in order, nothing held
            out.append((head, data))
            return
        if head.seq < self.next or head.seq in self._held:
            if head.seq <= self._after and head.type in TERMINAL_TYPES:
                self.ended = True  # it ended at or before what the reader has: nothing comes
                self._held.clear()
            return
        self._held[head.seq] = (head, data)
        self._release(out)

    def skip_gap(self, out: list[RawEvent]) -> None:
        """Gives up on the missing events before the first held one; appends what that releases."""
        if self._held and not self.ended:
            self.next = min(self._held)
        self._release(out)

    def _release(self, out: list[RawEvent]) -> None:
        while not self.ended and self.next in self._held:
            event = self._held.pop(self.next)
            self._deliver(event[0])
            out.append(event)
        if self.ended:
            self._held.clear()

    def _deliver(self, head: EventHead) -> None:
        self.next = head.seq + 1
        if head.type in TERMINAL_TYPES:
            self.ended = True


@dataclass
class Published:
    """What a request has published so far, as a client following it has seen it."""

    events: list[RawEvent] = field(default_factory=list)
    ended: bool = False  # it has its terminal event
    next_seq: int = 0  # the seq a continuing attempt publishes next
    started: bool = False  # its `start` event is out
    text: str = ""  # the answer's text so far (after the last `restart`)
    tokens: int = 0  # how many token events that text came in
    thinking: str = ""  # its reasoning text so far (after the last `restart`)
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls, in `index` order

    @property
    def empty(self) -> bool:
        return not self.events


def published(events: list[RawEvent]) -> Published:
    """Orders stored events as a client saw them; gaps are skipped, as the edge does in the end."""
    sequencer = Sequencer()
    ordered: list[RawEvent] = []
    for head, data in events:
        sequencer.offer(head, data, ordered)
    while sequencer.gap and not sequencer.ended:
        sequencer.skip_gap(ordered)
    parts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for head, data in ordered:
        if head.type == "token":
            parts.append(_decode_token(data).text)
        elif head.type == "thinking":
            thinking.append(_decode_thinking(data).text)
        elif head.type == "tool_call":
            calls.append(_decode_tool_call(data).call)
        elif head.type == "restart":
            parts.clear()
            thinking.clear()
    return Published(
        events=ordered,
        ended=sequencer.ended or any(h.type in TERMINAL_TYPES for h, _ in events),
        next_seq=sequencer.next,
        started=any(h.type == "start" for h, _ in ordered),
        text="".join(parts),
        tokens=len(parts),
        thinking="".join(thinking),
        tool_calls=calls,
    )


async def read(nc: Client, subject: str, *, wait: float = 5.0) -> list[RawEvent]:
    """Every event stored on `subject` in `LLM_OUT`, in stream order; [] when there is none.

    Raises `nats.errors.TimeoutError` if the stream does not answer within `wait` seconds (per batch).
    """
    return [(_decode_head(data), data) for data in await read_raw(nc, subject, wait=wait)]


async def read_raw(nc: Client, subject: str, *, wait: float = 5.0) -> list[bytes]:
    """The payloads of every message stored on `subject` in `LLM_OUT`, in stream order."""
    out: list[bytes] = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        start = 1
        while True:
            query = {"seq": start, "next_by_subj": subject, "batch": _BATCH}
            await nc.publish(_DIRECT_GET, json.dumps(query).encode(), reply=inbox)
            more = False
            while True:
                msg = await sub.next_msg(wait)
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status == "404":  # nothing (more) on this subject
                    return out
                if status == "204":  # end of batch: more when the server says some are pending
                    more = int(hdrs.get("Nats-Num-Pending", "0") or 0) > 0
                    start = int(hdrs.get("Nats-Last-Sequence", "0") or 0) + 1
                    break
                if status is not None:
                    raise NatsTimeoutError  # 408 and friends: treat as "did not answer"
                out.append(msg.data)
            if not more:
                return out
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def last(nc: Client, subject: str, *, wait: float = 2.0) -> bytes | None:
    """The payload of the last message stored on `subject` in `LLM_OUT`, or None."""
    msg = await nc.request(_DIRECT_GET, json.dumps({"last_by_subj": subject}).encode(), timeout=wait)
    if (msg.headers or {}).get("Status"):
        return None
    return msg.data
