"""The cheapest routing method: rules on what a request visibly is.

Keywords, prompt length, code, images, a JSON `format`. A rule matches when every condition it
sets holds; the first route (in file order) with a matching rule wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contracts import GenerateRequest
from services.classifier.routes import Route, RoutesFile, Rule

_FENCE = re.compile(r"```|~~~")
# One of these is code on its own: a definition, an include or import line, `inline(code)`.
_CODE_SURE = re.compile(
    r"^\s*(?:def \w+\s*\(.*\)\s*(?:->.*)?:|class \w+\s*[(:]|#include\s*[<\"]"
    r"|(?:from [\w.]+ )?import [\w.]+\s*$"
    r"|(?:function|func|fn)\s+\w+\s*\(|(?:public|private|static)\s+[\w<>\[\] ]+\s\w+\s*\()"
    r"|`[^`\n]*[()\[\]{}=;][^`\n]*`",
    re.MULTILINE,
)
# Two of these make code: statement endings, arrows, common keywords at a line start.
_CODE_LINE = re.compile(
    r"^\s*(?:return\b|const \w|let \w|var \w|package \w|SELECT\s.+\sFROM\s|if\s*\(|for\s*\()"
    r"|[;{}]\s*$|\)\s*(?:=>|->|\{)",
    re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class Features:
    text: str  # what is classified: the last user message, or the prompt
    chars: int  # the whole prompt: every message, or system + prompt
    code: bool
    images: bool
    format: bool


def has_code(text: str) -> bool:
    if _FENCE.search(text) or _CODE_SURE.search(text):
        return True
    lines = _CODE_LINE.finditer(text)
    return next(lines, None) is not None and next(lines, None) is not None


def features(request: GenerateRequest) -> Features:
    if request.messages is not None:
        users = [m.content for m in request.messages if m.role == "user"]
        text = users[-1] if users else request.messages[-1].content
        chars = sum(len(m.content) for m in request.messages)
        images = any(m.images for m in request.messages)
    else:
        text = request.prompt or ""
        chars = len(text) + len(request.system or "")
        images = False
    return Features(
        text=text, chars=chars, code=has_code(text), images=images, format=request.format is not None
    )


def _keywords(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class Rules:
    """A routes file's rules, compiled once per reload."""

    def __init__(self, routes: RoutesFile) -> None:
        self._compiled = [
            (route, [(rule, _keywords(rule.keywords)) for rule in route.rules])
            for route in routes.route
            if route.rules
        ]

    def match(self, f: Features) -> tuple[Route, str] | None:
        """The first route with a matching rule, and why it matched."""
        for route, rules in self._compiled:
            for rule, keywords in rules:
                why = _why(rule, keywords, f)
                if why is not None:
                    return route, why
        return None


def _why(rule: Rule, keywords: re.Pattern[str] | None, f: Features) -> str | None:
    reasons: list[str] = []
    if keywords is not None:
        hit = keywords.search(f.text)
        if hit is None:
            return None
        reasons.append(f"keyword {hit.group(0)!r}")
    for name, wanted, actual in (
        ("code", rule.code, f.code),
        ("images", rule.images, f.images),
        ("format", rule.format, f.format),
    ):
        if wanted is not None:
            if wanted != actual:
                return None
            reasons.append(f"{'has' if actual else 'no'} {name}")
    if rule.min_chars is not None:
        if f.chars < rule.min_chars:
            return None
        reasons.append(f"{f.chars} chars >= {rule.min_chars}")
    if rule.max_chars is not None:
        if f.chars > rule.max_chars:
            return None
        reasons.append(f"{f.chars} chars <= {rule.max_chars}")
    return "rule: " + ", ".join(reasons)
