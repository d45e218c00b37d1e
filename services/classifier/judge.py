"""An LLM asked for a JSON answer constrained by a schema (Ollama's `format`).

Used for ambiguous routes (the best routes scored within `judge_margin` of each other) and for
`"method": "llm"` classification. The schema's `enum` keeps the answer to the names offered, so
parsing cannot fail on a well-behaved server; anything else (timeout, bad JSON, an unknown name) is
reported to the caller, which falls back to the similarity answer.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec

from contracts import ErrorCode, GenerateRequest, LlmbusError, Message, Options, Usage
from services.classifier.routes import Route
from services.runtime.backends import Backend, Final

_ROUTER_SYSTEM = (
    "You decide which assistant should answer a user's message. "
    "Reply with JSON only, naming exactly one of the routes below.\n\nRoutes:\n"
)


async def ask_json(
    backend: Backend, model: str, system: str, user: str, *, schema: dict[str, Any], timeout_s: float
) -> tuple[Any, Usage]:
    """The model's answer to `user`, parsed, and what it cost; raises `LlmbusError` when there is
    no valid one."""
    request = GenerateRequest(
        id=uuid.uuid4().hex,
        model=model,
        messages=[Message("system", system), Message("user", user)],
        options=Options(temperature=0.0, num_predict=512),
        format=schema,
    )
    parts: list[str] = []
    usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in backend.generate(request):
                if isinstance(piece, Final):
                    spent = piece.prompt_tokens + piece.completion_tokens
                    usage = Usage(piece.prompt_tokens, piece.completion_tokens, spent)
                elif isinstance(piece, str):  # the answer; a reasoning model's thinking is not
                    parts.append(piece)
    except TimeoutError:
        raise LlmbusError(
            ErrorCode.DEADLINE_EXCEEDED, f"{model} did not answer within {timeout_s} s"
        ) from None
    try:
        return msgspec.json.decode("".join(parts)), usage
    except msgspec.DecodeError:
        raise LlmbusError(ErrorCode.BACKEND_ERROR, f"{model} did not answer with valid JSON") from None


def _describe(route: Route) -> str:
    examples = "; ".join(route.examples[:3])
    about = route.description or (f"e.g. {examples}" if examples else route.name)
    return f"- {route.name}: {about}"


async def pick_route(
    backend: Backend, model: str, text: str, candidates: list[Route], *, timeout_s: float
) -> Route:
    """One of `candidates` (offered in routes-file order, so position carries no score)."""
    names = [r.name for r in candidates]
    schema = {
        "type": "object",
        "properties": {"route": {"type": "string", "enum": names}},
        "required": ["route"],
    }
    system = _ROUTER_SYSTEM + "\n".join(_describe(r) for r in candidates)
    answer, _ = await ask_json(backend, model, system, text, schema=schema, timeout_s=timeout_s)
    name = answer.get("route") if isinstance(answer, dict) else None
    for route in candidates:
        if route.name == name:
            return route
    raise LlmbusError(ErrorCode.BACKEND_ERROR, f"{model} answered an unknown route {name!r}")


async def pick_labels(
    backend: Backend, model: str, text: str, labels: list[str], *, multi_label: bool, timeout_s: float
) -> tuple[list[float], Usage]:
    """1.0 for each label the model chose, 0.0 for the others, in label order; and what it cost."""
    if multi_label:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {label: {"type": "boolean"} for label in labels},
            "required": labels,
        }
        system = (
            "For each label, answer true if it applies to the user's text and false otherwise. "
            "Reply with JSON only."
        )
    else:
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": labels}},
            "required": ["label"],
        }
        system = "Choose the one label that best fits the user's text. Reply with JSON only."
    system += "\nLabels: " + ", ".join(labels)
    answer, usage = await ask_json(backend, model, system, text, schema=schema, timeout_s=timeout_s)
    if not isinstance(answer, dict):
        raise LlmbusError(ErrorCode.BACKEND_ERROR, f"{model} did not answer with a JSON object")
    if multi_label:
        return [1.0 if answer.get(label) is True else 0.0 for label in labels], usage
    if answer.get("label") not in labels:
        raise LlmbusError(
            ErrorCode.BACKEND_ERROR, f"{model} answered an unknown label {answer.get('label')!r}"
        )
    return [1.0 if label == answer["label"] else 0.0 for label in labels], usage
