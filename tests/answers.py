"""What a client should have seen: the fake's full answer, and a check of one request's events."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

_PIECE = re.compile(r"\S+\s*")


async def full_answer(ollama_url: str, model: str, messages: list[dict[str, str]]) -> list[str]:
    """The fake's deterministic answer to a chat, as its token pieces (one non-streaming call)."""
    async with httpx.AsyncClient(base_url=ollama_url, timeout=10) as http:
        response = await http.post("/api/chat", json={"model": model, "messages": messages, "stream": False})
        response.raise_for_status()
        return _PIECE.findall(response.json()["message"]["content"])


@dataclass
class Audit:
    """One request's events as a client received them, compared with the full answer."""

    events: list[dict[str, Any]]
    expected: list[str]
    terminals: int = 0
    seq_repeats: int = 0  # an event `seq` the client got twice
    seq_gaps: int = 0  # `seq` values the client never got
    lost: int = 0  # tokens of the answer the client never got
    duplicated: int = 0  # tokens the client got more than the answer has
    attempts: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, events: list[dict[str, Any]], expected: list[str]) -> Audit:
        audit = cls(events=events, expected=expected)
        seqs = [e["seq"] for e in events if e.get("seq", -1) >= 0]
        audit.seq_repeats = len(seqs) - len(set(seqs))
        audit.seq_gaps = (max(seqs) + 1 - len(set(seqs))) if seqs else 0
        audit.terminals = sum(e["type"] in ("done", "error") for e in events)
        # `queued` (the edge's, before `start`, seq -1) is no attempt of a worker.
        audit.attempts = {e["attempt"] for e in events if "attempt" in e and e["type"] != "queued"}
        got: list[str] = []
        for event in events:
            if event["type"] == "token":
                got.append(event["text"])
            elif event["type"] == "restart":
                got.clear()
        # Compare words, so a different split of the same text is not counted as a loss.
        want_words, got_words = "".join(expected).split(), "".join(got).split()
        for op, a1, a2, b1, b2 in difflib.SequenceMatcher(
            a=want_words, b=got_words, autojunk=False
        ).get_opcodes():
            if op in ("delete", "replace"):
                audit.lost += a2 - a1
            if op in ("insert", "replace"):
                audit.duplicated += b2 - b1
        return audit

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1]["type"] == "done"

    @property
    def seamless(self) -> bool:
        return self.terminals == 1 and not (self.seq_repeats or self.seq_gaps or self.lost or self.duplicated)
