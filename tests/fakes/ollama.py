"""A fake Ollama server: the one test double for Ollama's native HTTP API (``/api/*``).

It is a raw ASGI app served by uvicorn, fast enough at zero delay not to be the bottleneck
of a benchmark, and shaped after Ollama's ``docs/api.md`` and ``server/routes.go``: NDJSON
streaming (``application/x-ndjson``), a final chunk with ``done_reason`` and nanosecond
durations, ``{"error": "..."}`` bodies with Ollama's status codes, load/unload by empty
prompt and ``keep_alive``, pull/create/copy/delete/show/tags/ps/version, and blob upload
(``HEAD|POST /api/blobs/<digest>``, checked against the body's sha256) for ``create`` with
``files``.  ``pull_step_delay`` spaces a pull's status lines out, as a slow download does; a
pulled model appears in ``/api/tags`` once its pull is complete.

Use it in-process::

    async with FakeOllama(FakeConfig(first_token_delay=0.2)) as fake:
        ...  # point the code under test at fake.url
        [call] = await fake.wait_disconnected()  # no sleeps: wait_for(predicate) is evented
        assert call.tokens_sent == 0

or as a process: ``python -m tests.fakes.ollama --port 11434`` (prints
``fake ollama listening on http://HOST:PORT`` when ready), controlled over HTTP with
``GET /_fake/calls``, ``GET|POST /_fake/config`` and ``POST /_fake/reset``.

Deterministic text
    An answer is a sequence of tokens; token ``i`` is one word of a fixed vocabulary plus a
    space (``"word "``), picked by hashing the model name and the conversation (chat: every
    message except a trailing assistant one; generate: system, prompt and suffix) together
    with ``i``.  The same request always yields the same text.  The full answer has
    ``config.tokens`` tokens; ``options.num_predict`` (when positive) caps how many tokens
    one request emits, and ``done_reason`` is ``"length"`` when that cap cut the answer.

Continuation rule (resumption tests rely on it)
    If a chat request's ``messages`` end with an ``assistant`` message, that content is a
    prefix of the answer being continued.  Its token count is ``k = len(prefix.split())``
    and the reply emits tokens ``k, k+1, ...`` of the same answer (the conversation key
    ignores the prefix).  Hence ``prefix + continuation == full answer`` whenever the
    prefix is the verbatim concatenation of the first ``k`` streamed chunks, however the
    answer was split.  ``num_predict`` counts only the new tokens; a prefix already as long
    as the answer gets zero tokens and ``done_reason: "stop"``.

Structured output
    ``format: "json"`` answers ``{"text": "<config.tokens words>"}``; a JSON-schema
    ``format`` answers a minimal instance (required properties only; strings ``"x"``,
    numbers ``0``, booleans ``false``, arrays of ``minItems`` items, ``$ref``/``anyOf``/
    ``enum``/``const`` honoured).  Both are pretty-printed with indent 2, as Ollama's models
    tend to, and tokenised as ``\\S+\\s*`` pieces, so the continuation rule holds for them
    too.  ``num_predict`` can truncate them into invalid JSON, exactly as a real model can.

Faults
    ``fail_status`` (+ ``fail_times``) answers chat/generate/embed with an error body;
    ``disconnect_after`` (+ ``disconnect_times``) drops the TCP connection after N chunks;
    ``error_after`` streams Ollama's in-band ``{"error": ...}`` line; ``invalid_format_times``
    answers the next N schema ``format`` requests with ``{}``, which breaks any ``required``.
    A client hang-up is seen immediately, even during ``first_token_delay``, and stops the
    generation.

Capabilities (``/api/show`` ``capabilities``, checked as Ollama's ``CheckCapabilities`` does)
    ``completion`` for every model that is not an embedding model; ``tools`` unless the name
    starts with gemma, llava, moondream or phi; ``vision`` for llava, moondream, gemma3 and
    ``*vision*``/``*-vl*`` names; ``thinking`` for qwen3, deepseek-r1 and gpt-oss; ``insert``
    (``suffix``) for ``*coder*``/codellama/starcoder.  A request needing one the model lacks
    (``tools``, an image, ``think: true`` or a level, ``suffix``) gets 400
    ``"<model>" does not support <capability>``.

Tools, thinking, images, logprobs (``api/types.go`` shapes)
    With ``tools`` and a conversation whose last message is the user's, the answer is
    ``config.tool_calls`` calls (to the tools in order, cycling) and no text: each call
    ``{"id": "call_<hash>", "function": {"index": i, "name", "arguments": <a minimal instance
    of its parameters schema>}}`` in its own streamed chunk's ``message.tool_calls`` (all in
    ``message.tool_calls`` when not streamed), then ``done_reason: "stop"``.  After a ``tool``
    message it answers text as usual.  A message's ``tool_calls[].function.arguments`` must be
    an object.  ``think`` (true or a level) on a thinking model streams
    ``config.thinking_tokens`` words first, in ``message.thinking`` (chat) or ``thinking``
    (generate), never in ``content``; a continued answer (trailing assistant message) does not
    think again.  ``images`` (chat messages and generate) must be base64 (else Go's
    ``illegal base64 data at input byte N``).  ``logprobs: true`` adds ``logprobs: [{token,
    logprob, bytes, top_logprobs?}]`` to each text chunk (``top_logprobs`` entries when asked:
    the token first, then other words, each less likely).  Every call's body is recorded.

Deliberate differences
    Unknown models get ``model "x" not found, try pulling it first`` on every inference
    endpoint (recent Ollama says ``model 'x' not found`` on chat/generate); ``create`` does
    not auto-pull a missing base but fails as that pull would; no ``options.stop``,
    ``/v1/*``, push or blobs; tool calls are always made when tools are offered.

Embeddings
    ``/api/embed`` hashes lowercase words into ``dimensions`` (or ``config.embed_dim``)
    buckets with a hash-derived sign and L2-normalises, so texts sharing words have a
    higher cosine similarity than unrelated ones.  An input counts ``words + 2`` tokens;
    with ``truncate: false`` one longer than the context (4096) fails the whole call with
    400 ``the input length exceeds the context length``, as Ollama does.  A call holds a
    ``parallel`` slot while it pays its cost: Ollama serialises embedding calls on one runner.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import dataclasses
import gc
import hashlib
import logging
import math
import re
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import uvicorn

__all__ = ["DEFAULT_MODELS", "OLLAMA_VERSION", "Call", "FakeConfig", "FakeOllama", "main"]

OLLAMA_VERSION = "0.12.0"
DEFAULT_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "qwen2.5-coder:1.5b", "nomic-embed-text:latest")


@dataclass
class FakeConfig:
    """Behaviour knobs; read live on every request, so tests may mutate them at any time."""

    first_token_delay: float = 0.0  # seconds of "prompt evaluation" before the first chunk
    token_interval: float = 0.0  # seconds between chunks
    tokens: int = 8  # answer length in tokens
    load_delay: float = 0.0  # extra seconds when the model is not loaded yet
    fail_status: int | None = None  # chat/generate/embed calls answer this status ...
    fail_message: str | None = None  # ... with {"error": fail_message or a realistic default}
    fail_times: int | None = None  # fail only the next N calls (decremented); None = always
    disconnect_after: int | None = None  # drop the TCP connection after N token chunks
    disconnect_times: int | None = None  # drop only the next N generations; None = all
    error_after: int | None = None  # stream {"error": ...} after N chunks, as a crashed runner does
    invalid_format_times: int = 0  # the next N JSON-schema `format` answers are `{}` (decremented)
    tool_calls: int = 1  # calls in an answer to a request with `tools` (the last message the user's)
    thinking_tokens: int = 4  # words of thinking before the answer of a `think` request
    embed_call_cost: float = 0.0  # seconds per /api/embed call ...
    embed_item_cost: float = 0.0  # ... plus seconds per input item (Ollama on CPU)
    embed_dim: int = 64
    embed_dimensions: bool = True  # False: an older Ollama, which ignores `dimensions` (full-size vectors)
    parallel: int | None = None  # max concurrent generations/embed calls (OLLAMA_NUM_PARALLEL); others queue
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    pullable: set[str] | None = None  # names /api/pull can fetch; None = any name
    pull_step_delay: float = 0.0  # seconds between a streamed pull's status lines (a slow download)
    # trained context per model (`/api/show` model_info "<arch>.context_length"); by default
    # 131072 (llama3.2's) or 2048 for embedding models (nomic-embed-text's)
    context_lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class Call:
    """One HTTP request seen by the fake; times are ``time.monotonic()`` seconds."""

    method: str
    path: str
    body: Any
    started_at: float
    status: int | None = None
    first_byte_at: float | None = None  # first response body byte
    finished_at: float | None = None
    disconnected: bool = False  # the client hung up before the response was complete
    disconnected_at: float | None = None
    aborted: bool = False  # the fake dropped the connection (disconnect_after, stop())
    tokens_sent: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # names lower-case, as ASGI gives them


# ---------------------------------------------------------------------------- constants

_JSON_CT = b"application/json; charset=utf-8"
_NDJSON_CT = b"application/x-ndjson"
_TEXT_CT = b"text/plain; charset=utf-8"
_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode
_FOREVER = timedelta(seconds=(2**63 - 1) / 1e9)  # Go's math.MaxInt64 duration, ~292 years
_DEFAULT_KEEP_ALIVE = 300.0
_CONTEXT_LENGTH = 4096
_PIECE = re.compile(r"\S+\s*")
_WORD = re.compile(r"[a-z0-9]+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PARAMS = re.compile(r"(\d+(?:\.\d+)?)([bm])\b")
_M64 = (1 << 64) - 1
_VOCAB = (
    "the", "model", "answer", "river", "light", "stone", "quick", "green", "signal", "cloud",
    "token", "bridge", "garden", "orbit", "paper", "silver", "window", "forest", "engine", "music",
    "winter", "harbor", "pixel", "candle", "meadow", "rocket", "violet", "anchor", "canyon", "ember",
    "falcon", "glacier", "horizon", "island", "jungle", "kernel", "lantern", "marble", "nectar", "ocean",
    "prairie", "quartz", "ripple", "summit", "thunder", "umbrella", "valley", "willow", "yonder", "zephyr",
    "amber", "beacon", "copper", "delta", "echo", "fable", "granite", "hollow", "ivory", "jasper",
    "kite", "lotus", "mosaic", "nova",
)  # fmt: skip
_FAIL_DEFAULTS = {
    400: "invalid request",
    404: "model not found",
    429: "too many requests",
    500: "llama runner process has terminated: exit status 2",
    503: "server busy, please try again.  maximum pending requests exceeded",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _AbortConnection(Exception):
    """Raised out of the ASGI app so uvicorn drops the connection mid-response."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _QuietAbort(logging.Filter):
    """uvicorn logs every app exception; the deliberate connection drops are not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _AbortConnection))


_QUIET_ABORT = _QuietAbort()

# ---------------------------------------------------------------------------- pure helpers


def _now_iso() -> str:
    # Go marshals time.Now().UTC() as RFC3339Nano ("2024-01-02T03:04:05.123456Z").
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _local_iso(moment: datetime) -> str:
    return moment.astimezone().isoformat()


def _ns(seconds_ns: int) -> int:
    return max(1, seconds_ns)  # Ollama never reports a zero duration; clients divide by them


def normalize_name(name: str) -> str:
    """Ollama's canonical short name: lowercase, registry prefix dropped, ``:latest`` added."""
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def _parse_keep_alive(value: Any) -> float:
    """Seconds to keep a model loaded (``inf`` = forever), following Ollama's api.Duration."""
    if value is None:
        return _DEFAULT_KEEP_ALIVE
    if isinstance(value, bool):
        raise _HTTPError(400, "json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, int | float):
        return math.inf if value < 0 else float(int(value))  # Go truncates to whole seconds
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == "0":
            return 0.0
        parts = _DURATION_PART.findall(body)
        if not body or "".join(num + unit for num, unit in parts) != body:
            raise _HTTPError(400, f'time: invalid duration "{value}"')
        seconds = sign * sum(float(num) * _DURATION_UNITS[unit] for num, unit in parts)
        return math.inf if seconds < 0 else seconds
    raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(value)} into Go value of type api.Duration")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _require_object(body: Any, request_type: str) -> dict[str, Any]:
    if body is None:
        raise _HTTPError(400, "missing request body")
    if not isinstance(body, dict):
        raise _HTTPError(
            400, f"json: cannot unmarshal {_json_kind(body)} into Go value of type api.{request_type}"
        )
    return body


def _field(req: dict[str, Any], key: str, kind: type, default: Any, request_type: str, go_type: str) -> Any:
    """Typed field access with Go's encoding/json error text on a type mismatch."""
    value = req.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        kind_name = _json_kind(value)
        where = f"Go struct field {request_type}.{key} of type {go_type}"
        raise _HTTPError(400, f"json: cannot unmarshal {kind_name} into {where}")
    return value


def _model_field(req: dict[str, Any], request_type: str) -> str:
    """``model``, or the pre-0.5 ``name`` that management endpoints still accept."""
    model: str = _field(req, "model", str, "", request_type, "string")
    return model or str(_field(req, "name", str, "", request_type, "string"))


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _word(seed: int, index: int) -> str:
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _M64  # splitmix64: cheap, well mixed
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return _VOCAB[(z ^ (z >> 31)) % len(_VOCAB)]


def _is_embedding(name: str) -> bool:
    base = name.split(":", 1)[0]
    return any(part in base for part in ("embed", "minilm", "bge-"))


def _family(name: str) -> str:
    base = name.split(":", 1)[0].rsplit("/", 1)[-1]
    if base.startswith("nomic-embed"):
        return "nomic-bert"
    if _is_embedding(name):
        return "bert"
    match = re.match(r"[a-z]+\d*", base)  # qwen2.5 -> qwen2, gemma3 -> gemma3
    family = match.group(0) if match else "llama"
    return "llama" if family.startswith(("llama", "mistral")) else family


def _parameters(name: str) -> tuple[float, str]:
    match = _PARAMS.search(name.split(":", 1)[-1]) or _PARAMS.search(name)
    if match:
        value = float(match.group(1))
        unit = match.group(2)
        return value * (1e9 if unit == "b" else 1e6), f"{match.group(1)}{unit.upper()}"
    return (137e6, "137M") if _is_embedding(name) else (3.2e9, "3.2B")


def _model_size(name: str) -> int:
    params, _ = _parameters(name)
    return int(params * 0.62) + 40_000_000  # ~Q4_K_M weights plus tokenizer/template


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _details(name: str) -> dict[str, Any]:
    family = _family(name)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _parameters(name)[1],
        "quantization_level": _quantization(name),
    }


# Ollama's ggml.ParseFileType names (upper case) that `quantize` accepts.
_QUANT_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"}
)


def _quantization(name: str) -> str:
    """Embedding models and `fp16` tags are F16 (the only bases `create` can quantize)."""
    tag = name.split(":", 1)[1] if ":" in name else ""
    return "F16" if _is_embedding(name) or "fp16" in tag else "Q4_K_M"


def _capabilities(name: str) -> list[str]:
    if _is_embedding(name):
        return ["embedding"]
    base = name.split(":", 1)[0].rsplit("/", 1)[-1]
    found = ["completion"]
    if not base.startswith(("gemma", "llava", "moondream", "phi")):
        found.append("tools")
    if (
        base.startswith(("llava", "moondream", "gemma3"))
        or "vision" in base
        or "-vl" in base
        or "vl:" in name
    ):
        found.append("vision")
    if base.startswith(("qwen3", "deepseek-r1", "gpt-oss")):
        found.append("thinking")
    if "coder" in base or base.startswith(("codellama", "starcoder")):
        found.append("insert")
    return found


def _check_images(images: Any, where: str) -> bool:
    """Go decodes ``[]ImageData`` from base64 strings; True when there is at least one."""
    if images is None:
        return False
    if not isinstance(images, list):
        raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(images)} into Go struct field {where}")
    for image in images:
        if not isinstance(image, str):
            raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(image)} into Go struct field {where}")
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise _HTTPError(400, "illegal base64 data at input byte 0") from None
    return bool(images)


def _check_tool_calls(message: dict[str, Any]) -> None:
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(arguments, dict):
            where = "Go struct field .messages.tool_calls.function.arguments of type map[string]interface {}"
            raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(arguments)} into {where}")


def _logprob(seed: int, index: int, piece: str, top: int) -> dict[str, Any]:
    logprob = -((seed >> (index % 48)) % 997) / 331  # deterministic, in (-3, 0]
    entry: dict[str, Any] = {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
    if top > 0:
        rivals = [_word(seed ^ 0x5A5A, index * 31 + k) for k in range(top - 1)]
        entry["top_logprobs"] = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}] + [
            {"token": w, "logprob": logprob - 1.0 - k, "bytes": list(w.encode())}
            for k, w in enumerate(rivals)
        ]
    return entry


def _embed_tokens(text: str) -> int:
    return len(_WORD.findall(text.lower())) + 2


def _embedding(text: str, dim: int) -> list[float]:
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        h = zlib.crc32(word.encode())
        vector[h % dim] += 1.0 if h & 0x80000000 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for raw_part in ref[1:].split("/"):
        if raw_part:
            part = raw_part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _schema_number(schema: dict[str, Any], integer: bool) -> int | float:
    value: float = 0
    low, high = schema.get("minimum"), schema.get("maximum")
    xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(xlow, int | float) and value <= xlow:
        value = xlow + (1 if integer else 0.5)
    if isinstance(high, int | float) and value > high:
        value = high
    if isinstance(xhigh, int | float) and value >= xhigh:
        value = xhigh - (1 if integer else 0.5)
    return math.ceil(value) if integer else value


_STRING_FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00",
    "email": "x@example.com",
    "uri": "http://example.com",
    "url": "http://example.com",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "ipv4": "127.0.0.1",
}


def schema_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A minimal JSON value satisfying ``schema`` (the structured-output ``format``)."""
    root = schema if root is None else root
    if depth > 32 or not isinstance(schema, dict):
        return None
    if isinstance(schema.get("$ref"), str):
        return schema_instance(_resolve_ref(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return schema_instance((real or options)[0], root, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = schema_instance(part, root, depth + 1)
            if not isinstance(value, dict):
                return value
            merged.update(value)
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        required = [k for k in schema.get("required") or [] if isinstance(k, str)]
        return {k: schema_instance(props.get(k, {}), root, depth + 1) for k in required}
    if kind == "array":
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        count = max(int(schema.get("minItems") or 0), 0)
        return [
            schema_instance(prefix[i] if i < len(prefix) else items, root, depth + 1) for i in range(count)
        ]
    if kind in ("integer", "number"):
        return _schema_number(schema, kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _STRING_FORMATS:
        return _STRING_FORMATS[fmt]
    return "x" * max(int(schema.get("minLength") or 1), 1) if schema.get("maxLength") != 0 else ""


def _format_text(fmt: Any, seed: int, tokens: int) -> str:
    if fmt == "json":
        value: Any = {"text": " ".join(_word(seed, i) for i in range(max(tokens, 1)))}
    elif isinstance(fmt, dict):
        value = schema_instance(fmt)
    else:
        raw = _ENCODE(fmt).decode()
        raise _HTTPError(500, f'invalid format: "{raw}"; expected "json" or a valid JSON Schema object')
    return msgspec.json.format(_ENCODE(value), indent=2).decode()


def _parse_modelfile(text: str) -> dict[str, Any]:
    """The few Modelfile instructions the fake cares about (FROM, SYSTEM, TEMPLATE, PARAMETER)."""
    found: dict[str, Any] = {"parameters": {}}
    lines = iter(text.splitlines())
    for line in lines:
        command, _, rest = line.strip().partition(" ")
        command, rest = command.upper(), rest.strip()
        if rest.startswith('"""'):  # multi-line value
            chunk = [rest[3:]]
            while not chunk[-1].endswith('"""'):
                nxt = next(lines, None)
                if nxt is None:
                    break
                chunk.append(nxt)
            rest = "\n".join(chunk).removesuffix('"""')
        if command == "FROM":
            found["from"] = rest
        elif command in ("SYSTEM", "TEMPLATE"):
            found[command.lower()] = rest.strip('"')
        elif command == "PARAMETER":
            key, _, val = rest.partition(" ")
            found["parameters"][key] = val.strip().strip('"')
    return found


@dataclass
class _ModelMeta:
    modified_at: datetime
    root: str  # the originally pulled model this one derives from (size, family)
    parent: str = ""
    system: str = ""
    template: str = "{{ .Prompt }}"
    parameters: dict[str, Any] = field(default_factory=dict)
    quantization: str = ""  # set by `create` with `quantize`; else the root's


@dataclass
class _Thought:
    text: str


# A streamed chunk's payload: answer text, thinking, or one complete tool call (Ollama's JSON).
_PlanPiece = str | _Thought | dict[str, Any]


@dataclass
class _Plan:
    chat: bool
    model: str  # as the client spelled it; Ollama echoes req.Model
    name: str
    pieces: list[_PlanPiece]
    done_reason: str
    prompt_tokens: int
    stream: bool
    keep_alive: float
    t0: int
    context: list[int] | None = None
    abort_at: int | None = None
    error_at: int | None = None
    seed: int = 0
    logprobs: int | None = None  # None: not asked; else how many top_logprobs


def _text(plan: _Plan) -> str:
    return "".join(p for p in plan.pieces if isinstance(p, str))


def _decorate(
    plan: _Plan, req: dict[str, Any], key: str, config: FakeConfig, *, thinks: bool, tools: list[Any] | None
) -> None:
    """Thinking before the answer, tool calls instead of its text, logprobs on its text."""
    plan.seed = _seed(key)
    if req.get("logprobs") is True:
        plan.logprobs = int(req.get("top_logprobs") or 0)
    if tools:
        calls: list[_PlanPiece] = []
        for i in range(max(config.tool_calls, 0)):
            tool = tools[i % len(tools)]
            function = tool.get("function") if isinstance(tool, dict) else None
            function = function if isinstance(function, dict) else {}
            arguments = schema_instance(function.get("parameters") or {"type": "object"})
            name = str(function.get("name") or "")
            calls.append(
                {
                    "id": f"call_{_seed(f'{key}{i}') & 0xFFFFFFFF:08x}",
                    "function": {"index": i, "name": name, "arguments": arguments or {}},
                }
            )
        plan.pieces = calls
        plan.done_reason = "stop"
    if thinks and req.get("think") not in (None, False):
        thought = [_Thought(_word(plan.seed ^ 0x7417, i) + " ") for i in range(config.thinking_tokens)]
        plan.pieces = [*thought, *plan.pieces]


class _Exchange:
    """One request/response cycle: the ASGI callables plus what has been sent so far."""

    __slots__ = ("call", "receive", "response_done", "send", "started")

    def __init__(self, receive: Receive, send: Send, call: Call) -> None:
        self.receive = receive
        self.send = send
        self.call = call
        self.started = False
        self.response_done = False

    async def start(self, status: int, content_type: bytes | None, length: int | None = None) -> None:
        headers = [] if content_type is None else [(b"content-type", content_type)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.started = True
        self.call.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes) -> None:
        if self.call.first_byte_at is None:
            self.call.first_byte_at = time.monotonic()
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        # Flag first: the final send wakes the disconnect watcher, which must not mistake
        # uvicorn's "response complete" http.disconnect for a client hang-up.
        self.response_done = True
        if data and self.call.first_byte_at is None:
            self.call.first_byte_at = time.monotonic()
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def respond(self, status: int, content_type: bytes | None, data: bytes) -> None:
        await self.start(status, content_type, len(data))
        await self.finish(data)

    async def json(self, obj: Any, status: int = 200) -> None:
        await self.respond(status, _JSON_CT, _ENCODE(obj))


Handler = Callable[[_Exchange, Any], Awaitable[None]]


# ---------------------------------------------------------------------------- the fake


class FakeOllama:
    """The fake server: an ASGI app (``await fake(scope, receive, send)``) plus its uvicorn."""

    def __init__(self, config: FakeConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config if config is not None else FakeConfig()
        self.host = host
        self.port = port
        self.calls: list[Call] = []
        self.active = 0  # generations and embed calls holding a parallel slot
        self._initial = copy.deepcopy(self.config)
        self._loaded: dict[str, datetime] = {}
        self._in_use: dict[str, int] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._meta: dict[str, _ModelMeta] = {}
        self._blobs: set[str] = set()  # digests uploaded through /api/blobs
        self._born = datetime.now(UTC)
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._changed: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._closing = False  # stop() in progress: hang-ups are ours, not the client's
        self._routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/chat": {"POST": self._chat},
            "/api/generate": {"POST": self._generate},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/api/blobs/": {"HEAD": self._blob, "POST": self._blob},  # + "sha256:<hex>"
            "/_fake/calls": {"GET": self._fake_calls},
            "/_fake/config": {"GET": self._fake_config, "POST": self._fake_config},
            "/_fake/reset": {"POST": self._fake_reset},
        }

    # -- state seen by tests

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOllama is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def loaded(self) -> dict[str, datetime]:
        """Loaded models (canonical name -> expires_at), expired ones dropped."""
        self._purge()
        return self._loaded

    def reset(self) -> None:
        """Back to the constructor's config, no calls, nothing loaded, no created models."""
        for f in dataclasses.fields(FakeConfig):
            setattr(self.config, f.name, copy.deepcopy(getattr(self._initial, f.name)))
        self.calls.clear()
        self._loaded.clear()
        self._meta.clear()
        self._blobs.clear()
        self._wake_slots()
        self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; re-checked whenever a call or model changes."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    async def wait_disconnected(self, n: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait for ``n`` client hang-ups; returns the disconnected calls."""
        await self.wait_for(lambda: sum(c.disconnected for c in self.calls) >= n, timeout)
        return [c for c in self.calls if c.disconnected]

    async def wait_calls(self, n: int = 1, path: str | None = None, timeout: float = 5.0) -> list[Call]:
        """Wait for ``n`` calls (to ``path`` if given); returns them."""

        def matching() -> list[Call]:
            return [c for c in self.calls if path is None or c.path == path]

        await self.wait_for(lambda: len(matching()) >= n, timeout)
        return matching()

    def _notify(self) -> None:
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    # -- lifecycle

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 = any free one) in the running event loop."""
        if self._server is not None:
            raise RuntimeError("FakeOllama already started")
        error_logger = logging.getLogger("uvicorn.error")
        if _QUIET_ABORT not in error_logger.filters:
            error_logger.addFilter(_QUIET_ABORT)
        config = uvicorn.Config(
            self,
            host=self.host,
            port=self.port,
            loop="none",
            lifespan="off",
            ws="none",
            log_level="warning",
            log_config=None,  # leave the test process's logging setup alone
            proxy_headers=False,
            server_header=False,  # Go's net/http sends no Server header
            date_header=False,  # uvicorn refreshes it only from Server.main_loop, which we skip
            # Ollama's http.Server sets no IdleTimeout: idle keep-alive connections stay open
            # (uvicorn's default closes them after 5 s, which pooled clients then trip over).
            timeout_keep_alive=3600,
        )
        server = uvicorn.Server(config)
        config.load()
        # What Server.serve() does, minus its signal capture and 0.1 s shutdown polling:
        # the fake is started and stopped many times per test run.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit as exc:  # uvicorn exits the process when it cannot bind
            raise OSError(f"fake ollama could not listen on {self.host}:{self.port}") from exc
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._server = server

    async def stop(self) -> None:
        """Stop promptly, like Go's ``Server.Close``: every connection is dropped, so
        in-flight requests end at once (recorded as ``aborted``) and teardown never hangs."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        try:
            for listener in server.servers:
                listener.close()
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.close()  # the disconnect watchers then stop the work
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while server.server_state.tasks and loop.time() < deadline:
                await asyncio.sleep(0.005)
            for task in list(server.server_state.tasks):
                task.cancel()  # a handler stuck outside a watched wait; should not happen
            for listener in server.servers:
                await listener.wait_closed()
        finally:
            self._closing = False

    # -- ASGI entry point

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and Ollama speaks no websocket
        path: str = scope["path"]
        method: str = scope["method"]
        call = Call(method=method, path=path, body=None, started_at=time.monotonic())
        call.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        if not path.startswith("/_fake/"):
            self.calls.append(call)
            self._notify()
        ex = _Exchange(receive, send, call)
        try:
            raw = await self._read_body(ex)
            if raw is None:
                return
            blob = path.startswith("/api/blobs/")
            routes = self._routes.get("/api/blobs/" if blob else path)
            if routes is None:  # Go's default mux/gin answer
                await ex.respond(404, b"text/plain", b"404 page not found")
                return
            handler = routes.get(method)
            if handler is None:
                await ex.respond(405, b"text/plain", b"405 method not allowed")
                return
            body: Any = None
            if blob:
                body = raw  # a model file, not JSON
            elif raw.strip():
                try:
                    body = call.body = _DECODE(raw)
                except msgspec.DecodeError as exc:
                    raise _HTTPError(400, str(exc)) from None
            await handler(ex, body)
        except _HTTPError as exc:
            if ex.started:
                raise _AbortConnection from exc
            await ex.json({"error": exc.message}, exc.status)
        finally:
            call.finished_at = time.monotonic()
            self._notify()

    async def _read_body(self, ex: _Exchange) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            message = await ex.receive()
            if message["type"] == "http.disconnect":
                ex.call.disconnected = True
                ex.call.disconnected_at = time.monotonic()
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run_watched(self, ex: _Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` while watching ``receive()`` so a client hang-up stops it at once,
        even while it sleeps before the first token (uvicorn only notices hang-ups when
        someone awaits ``receive``)."""
        producer = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._watch(ex))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not producer.done() and (ex.call.disconnected or ex.call.aborted):
                producer.cancel()
            try:
                await producer
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # The connection is gone (client hang-up or stop()): nothing left to send.
        finally:
            producer.cancel()
            watcher.cancel()

    async def _watch(self, ex: _Exchange) -> None:
        while True:
            message = await ex.receive()
            if message["type"] == "http.disconnect":
                if ex.response_done:
                    return
                if self._closing:
                    ex.call.aborted = True
                else:
                    ex.call.disconnected = True
                    ex.call.disconnected_at = time.monotonic()
                self._notify()
                return

    # -- model registry

    def _known(self) -> dict[str, str]:
        return {normalize_name(m): m for m in self.config.models}

    def _resolve(self, model: str) -> str:
        name = normalize_name(model)
        if name not in self._known():
            raise _HTTPError(404, f'model "{model}" not found, try pulling it first')
        return name

    def _meta_for(self, name: str) -> _ModelMeta:
        return self._meta.get(name) or _ModelMeta(modified_at=self._born, root=name)

    def _add_model(self, name: str, meta: _ModelMeta) -> None:
        if name not in self._known():
            self.config.models.append(name)
        self._meta[name] = meta

    def _model_entry(self, name: str) -> dict[str, Any]:
        meta = self._meta_for(name)
        details = _details(meta.root)
        details["parent_model"] = meta.parent
        details["quantization_level"] = meta.quantization or details["quantization_level"]
        return {
            "name": name,
            "model": name,
            "size": _model_size(meta.root),
            "digest": _digest(name),
            "details": details,
        }

    # -- loading, keep_alive and parallel slots

    def _expiry(self, keep_alive: float) -> datetime:
        now = datetime.now(UTC)
        return now + _FOREVER if math.isinf(keep_alive) else now + timedelta(seconds=keep_alive)

    def _purge(self) -> None:
        now = datetime.now(UTC)
        for name, expires in list(self._loaded.items()):
            if expires <= now and not self._in_use.get(name):
                del self._loaded[name]

    async def _ensure_loaded(self, name: str, keep_alive: float) -> None:
        self._purge()
        if name not in self._loaded:
            lock = self._load_locks.setdefault(name, asyncio.Lock())
            async with lock:  # concurrent first requests share one load, as in Ollama's scheduler
                if name not in self._loaded:
                    if self.config.load_delay > 0:
                        await asyncio.sleep(self.config.load_delay)
                    self._loaded[name] = self._expiry(keep_alive)
                    self._notify()
        self._loaded[name] = self._expiry(keep_alive)

    def _release_model(self, name: str, keep_alive: float) -> None:
        users = self._in_use.get(name, 1) - 1
        if users > 0:
            self._in_use[name] = users
        else:
            self._in_use.pop(name, None)
        if name in self._loaded:
            if keep_alive == 0 and not users:
                del self._loaded[name]
            else:
                self._loaded[name] = self._expiry(keep_alive)
        self._notify()

    async def _acquire_slot(self) -> None:
        loop = asyncio.get_running_loop()
        while self.config.parallel is not None and self.active >= self.config.parallel:
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            await waiter  # woken on every release; the loop re-checks the limit
        self.active += 1
        self._notify()

    def _release_slot(self) -> None:
        self.active -= 1
        self._wake_slots()
        self._notify()

    def _wake_slots(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- failure injection

    def _injected_failure(self) -> None:
        cfg = self.config
        if cfg.fail_status is None:
            return
        if cfg.fail_times is not None:
            if cfg.fail_times <= 0:
                return
            cfg.fail_times -= 1
        message = cfg.fail_message or _FAIL_DEFAULTS.get(cfg.fail_status, "fake ollama: injected failure")
        raise _HTTPError(cfg.fail_status, message)

    def _abort_point(self) -> int | None:
        cfg = self.config
        if cfg.disconnect_after is None:
            return None
        if cfg.disconnect_times is not None:
            if cfg.disconnect_times <= 0:
                return None
            cfg.disconnect_times -= 1
        return max(cfg.disconnect_after, 0)

    # -- chat / generate

    async def _chat(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "ChatRequest")
        model = _field(req, "model", str, "", "ChatRequest", "string")
        if not model:
            raise _HTTPError(400, "model is required")
        messages = _field(req, "messages", list, [], "ChatRequest", "[]api.Message")
        images = False
        for message in messages:
            if not isinstance(message, dict):
                where = "Go struct field ChatRequest.messages of type api.Message"
                raise _HTTPError(400, f"json: cannot unmarshal {_json_kind(message)} into {where}")
            images |= _check_images(
                message.get("images"), "ChatRequest.messages.images of type []api.ImageData"
            )
            _check_tool_calls(message)
        tools = _field(req, "tools", list, [], "ChatRequest", "api.Tools")
        name = self._resolve(model)
        keep_alive = _parse_keep_alive(req.get("keep_alive"))
        stream = _field(req, "stream", bool, True, "ChatRequest", "bool")
        self._injected_failure()
        if not messages and keep_alive == 0:  # Ollama unloads before checking capabilities
            await self._load_or_unload(ex, model, name, keep_alive, chat=True)
            return
        self._check_generation(req, model, name, "chat", tools=bool(tools), images=images)
        if not messages:
            await self._load_or_unload(ex, model, name, keep_alive, chat=True)
            return
        convo, prefix = messages, ""
        if messages[-1].get("role") == "assistant":  # "continue from prefix"
            convo, prefix = messages[:-1], str(messages[-1].get("content") or "")
        key = "\x1f".join([name, *(f"{m.get('role', '')}\x1e{m.get('content') or ''}" for m in convo)])
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in messages) + 1
        plan = self._plan(req, model, name, key, len(prefix.split()), prompt_tokens, stream, keep_alive, True)
        calls = tools and convo and convo[-1].get("role") == "user"
        _decorate(plan, req, key, self.config, thinks=not prefix, tools=tools if calls else None)
        await self._run_watched(ex, self._produce(ex, plan))

    async def _generate(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "GenerateRequest")
        model = _field(req, "model", str, "", "GenerateRequest", "string")
        if not model:
            raise _HTTPError(404, "model '' not found")
        prompt = _field(req, "prompt", str, "", "GenerateRequest", "string")
        system = _field(req, "system", str, "", "GenerateRequest", "string")
        suffix = _field(req, "suffix", str, "", "GenerateRequest", "string")
        raw = _field(req, "raw", bool, False, "GenerateRequest", "bool")
        images = _check_images(req.get("images"), "GenerateRequest.images of type []api.ImageData")
        name = self._resolve(model)
        keep_alive = _parse_keep_alive(req.get("keep_alive"))
        stream = _field(req, "stream", bool, True, "GenerateRequest", "bool")
        self._injected_failure()
        if not prompt and keep_alive == 0:
            await self._load_or_unload(ex, model, name, keep_alive, chat=False)
            return
        self._check_generation(req, model, name, "generate", images=images, suffix=bool(suffix))
        if not prompt:
            await self._load_or_unload(ex, model, name, keep_alive, chat=False)
            return
        key = "\x1f".join([name, system, prompt, suffix])
        prompt_words = prompt.split()
        prompt_tokens = len(prompt_words) + len(system.split()) + (0 if raw else 8)
        plan = self._plan(req, model, name, key, 0, prompt_tokens, stream, keep_alive, False)
        _decorate(plan, req, key, self.config, thinks=True, tools=None)
        if not raw:  # Ollama returns no context in raw mode
            words = prompt_words + _text(plan).split()
            plan.context = [zlib.crc32(w.encode()) % 128256 for w in words]
        await self._run_watched(ex, self._produce(ex, plan))

    def _check_generation(
        self,
        req: dict[str, Any],
        model: str,
        name: str,
        verb: str,
        *,
        tools: bool = False,
        images: bool = False,
        suffix: bool = False,
    ) -> None:
        if _is_embedding(name):
            raise _HTTPError(400, f'"{model}" does not support {verb}')
        think = req.get("think")
        if think not in (None, True, False, "low", "medium", "high"):
            raise _HTTPError(400, f"invalid think value: {_ENCODE(think).decode()}")
        needed = [
            ("tools", tools),
            ("insert", suffix),
            ("vision", images),
            ("thinking", think not in (None, False)),
        ]
        have = _capabilities(self._meta_for(name).root)
        for capability, wanted in needed:
            if wanted and capability not in have:
                raise _HTTPError(400, f'"{model}" does not support {capability}')
        top = req.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
            raise _HTTPError(400, "top_logprobs must be between 0 and 20")

    def _plan(
        self,
        req: dict[str, Any],
        model: str,
        name: str,
        key: str,
        skip: int,
        prompt_tokens: int,
        stream: bool,
        keep_alive: float,
        chat: bool,
    ) -> _Plan:
        request_type = "ChatRequest" if chat else "GenerateRequest"
        options = _field(req, "options", dict, {}, request_type, "map[string]interface {}")
        limit = options.get("num_predict")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        seed = _seed(key)
        fmt = req.get("format")
        if fmt is None or fmt == "":
            total = max(self.config.tokens, 0)
            start = min(skip, total)
            stop = total if limit is None else min(total, start + limit)
            pieces: list[_PlanPiece] = [_word(seed, i) + " " for i in range(start, stop)]
        else:
            text = _format_text(fmt, seed, self.config.tokens)
            if isinstance(fmt, dict) and self.config.invalid_format_times > 0:
                self.config.invalid_format_times -= 1
                text = "{}"  # what a model ignoring the schema might say: no required property
            every = _PIECE.findall(text)
            total = len(every)
            start = min(skip, total)
            stop = total if limit is None else min(total, start + limit)
            pieces = every[start:stop]
        return _Plan(
            chat=chat,
            model=model,
            name=name,
            pieces=pieces,
            done_reason="length" if stop < total else "stop",
            prompt_tokens=prompt_tokens,
            stream=stream,
            keep_alive=keep_alive,
            t0=time.perf_counter_ns(),
            abort_at=self._abort_point(),
            error_at=self.config.error_after,
        )

    def _chunk(self, plan: _Plan, index: int, piece: _PlanPiece) -> bytes:
        text = piece if isinstance(piece, str) else ""
        if plan.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            obj: dict[str, Any] = {"model": plan.model, "created_at": _now_iso(), "message": message}
            if isinstance(piece, _Thought):
                message["thinking"] = piece.text
            elif isinstance(piece, dict):
                message["tool_calls"] = [piece]
        else:
            obj = {"model": plan.model, "created_at": _now_iso(), "response": text}
            if isinstance(piece, _Thought):
                obj["thinking"] = piece.text
        obj["done"] = False
        if plan.logprobs is not None and isinstance(piece, str):
            obj["logprobs"] = [_logprob(plan.seed, index, piece, plan.logprobs)]
        return _ENCODE(obj) + b"\n"

    def _final(self, plan: _Plan, text: str, t_loaded: int, t_slot: int, t_first: int, t_end: int) -> bytes:
        metrics: dict[str, Any] = {
            "total_duration": _ns(time.perf_counter_ns() - plan.t0),
            "load_duration": _ns(t_loaded - plan.t0),
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": _ns(t_first - t_slot),
        }
        if plan.pieces:  # Go's omitempty drops zero counts
            metrics["eval_count"] = len(plan.pieces)
            metrics["eval_duration"] = _ns(t_end - t_first)
        obj: dict[str, Any] = {"model": plan.model, "created_at": _now_iso()}
        whole = text != "" or not plan.stream  # the non-streamed answer carries everything at once
        thinking = "".join(p.text for p in plan.pieces if isinstance(p, _Thought)) if whole else ""
        if plan.chat:
            obj["message"] = {"role": "assistant", "content": text}
            if thinking:
                obj["message"]["thinking"] = thinking
            calls = [p for p in plan.pieces if isinstance(p, dict)] if whole else []
            if calls:
                obj["message"]["tool_calls"] = calls
            obj["done_reason"] = plan.done_reason
            obj["done"] = True
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
            obj["done"] = True
            obj["done_reason"] = plan.done_reason
            if plan.context is not None:
                obj["context"] = plan.context
        obj.update(metrics)
        return _ENCODE(obj)

    async def _produce(self, ex: _Exchange, plan: _Plan) -> None:
        call = ex.call
        self._in_use[plan.name] = self._in_use.get(plan.name, 0) + 1
        try:
            await self._ensure_loaded(plan.name, plan.keep_alive)
            t_loaded = time.perf_counter_ns()
            await self._acquire_slot()
            try:
                t_slot = time.perf_counter_ns()
                if self.config.first_token_delay > 0:
                    await asyncio.sleep(self.config.first_token_delay)
                t_first = time.perf_counter_ns()
                for index, piece in enumerate(plan.pieces):
                    if await self._before_token(ex, plan, index):
                        return
                    if index and self.config.token_interval > 0:
                        await asyncio.sleep(self.config.token_interval)
                    if plan.stream:
                        if not ex.started:
                            await ex.start(200, _NDJSON_CT)
                        await ex.write(self._chunk(plan, index, piece))
                    call.tokens_sent += 1
                    self._notify()
                if await self._before_token(ex, plan, len(plan.pieces)):
                    return
                t_end = time.perf_counter_ns()
                if plan.stream:
                    if not ex.started:
                        await ex.start(200, _NDJSON_CT)
                    await ex.finish(self._final(plan, "", t_loaded, t_slot, t_first, t_end) + b"\n")
                else:
                    final = self._final(plan, _text(plan), t_loaded, t_slot, t_first, t_end)
                    if plan.logprobs is not None:
                        every = [p for p in plan.pieces if isinstance(p, str)]
                        logprobs = [_logprob(plan.seed, i, p, plan.logprobs) for i, p in enumerate(every)]
                        final = final[:-1] + b',"logprobs":' + _ENCODE(logprobs) + b"}"
                    await ex.respond(200, _JSON_CT, final)
            finally:
                self._release_slot()
        finally:
            self._release_model(plan.name, plan.keep_alive)

    async def _before_token(self, ex: _Exchange, plan: _Plan, index: int) -> bool:
        """Injected mid-generation failures before chunk ``index`` (or the final chunk).

        Returns True when the response is complete (an error was reported in-band)."""
        if index == plan.abort_at:
            ex.call.aborted = True
            if not plan.stream:  # promise a full body, deliver half of it
                body = self._final(plan, _text(plan), plan.t0, plan.t0, plan.t0, plan.t0)
                await ex.start(200, _JSON_CT, len(body))
                await ex.write(body[: len(body) // 2])
            elif not ex.started:
                await ex.start(200, _NDJSON_CT)
            raise _AbortConnection
        if index == plan.error_at:
            message = self.config.fail_message or _FAIL_DEFAULTS[500]
            if not ex.started:  # nothing streamed yet: Ollama still sets the status
                await ex.json({"error": message}, 500)
            else:
                await ex.finish(_ENCODE({"error": message}) + b"\n")
            return True
        return False

    async def _load_or_unload(
        self, ex: _Exchange, model: str, name: str, keep_alive: float, chat: bool
    ) -> None:
        if keep_alive == 0:
            reason = "unload"
            self._loaded.pop(name, None)
            self._notify()
        else:
            reason = "load"
            await self._run_watched(ex, self._ensure_loaded(name, keep_alive))
            if ex.call.disconnected or ex.call.aborted:
                return
        obj: dict[str, Any] = {"model": model, "created_at": _now_iso()}
        if chat:
            obj |= {"message": {"role": "assistant", "content": ""}, "done_reason": reason, "done": True}
        else:
            obj |= {"response": "", "done": True, "done_reason": reason}
        await ex.json(obj)

    # -- embeddings

    async def _embed(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "EmbedRequest")
        model = _field(req, "model", str, "", "EmbedRequest", "string")
        raw_input = req.get("input")
        if isinstance(raw_input, str) or raw_input is None:
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(i, str) for i in raw_input):
            inputs = raw_input
        else:
            raise _HTTPError(400, "invalid input type")
        dimensions = _field(req, "dimensions", int, 0, "EmbedRequest", "int")
        if _field(req, "truncate", bool, True, "EmbedRequest", "bool") is False and any(
            _embed_tokens(text) > _CONTEXT_LENGTH for text in inputs
        ):
            raise _HTTPError(400, "the input length exceeds the context length")
        size = dimensions if dimensions and self.config.embed_dimensions else self.config.embed_dim
        result = await self._embed_all(ex, req, model, inputs, size)
        if result is not None:
            await ex.json(result if inputs else {"model": model, "embeddings": []})

    async def _embeddings(self, ex: _Exchange, body: Any) -> None:
        """The legacy single-prompt endpoint, superseded by /api/embed."""
        req = _require_object(body, "EmbeddingRequest")
        model = _field(req, "model", str, "", "EmbeddingRequest", "string")
        prompt = _field(req, "prompt", str, "", "EmbeddingRequest", "string")
        result = await self._embed_all(ex, req, model, [prompt] if prompt else [], self.config.embed_dim)
        if result is not None:
            await ex.json({"embedding": result["embeddings"][0] if prompt else []})

    async def _embed_all(
        self, ex: _Exchange, req: dict[str, Any], model: str, inputs: list[str], dim: int
    ) -> dict[str, Any] | None:
        """Load, pay the configured CPU cost, embed; None when the client hung up meanwhile."""
        if not model:
            raise _HTTPError(400, "model is required")
        name = self._resolve(model)
        keep_alive = _parse_keep_alive(req.get("keep_alive"))
        self._injected_failure()
        t0 = time.perf_counter_ns()
        result: dict[str, Any] = {}

        async def work() -> None:
            self._in_use[name] = self._in_use.get(name, 0) + 1
            try:
                await self._ensure_loaded(name, keep_alive)
                t_loaded = time.perf_counter_ns()
                cost = (
                    self.config.embed_call_cost + self.config.embed_item_cost * len(inputs) if inputs else 0
                )
                if cost > 0:
                    await self._acquire_slot()
                    try:
                        await asyncio.sleep(cost)
                    finally:
                        self._release_slot()
                result.update(
                    model=model,
                    embeddings=[_embedding(text, dim) for text in inputs],
                    total_duration=_ns(time.perf_counter_ns() - t0),
                    load_duration=_ns(t_loaded - t0),
                    prompt_eval_count=sum(min(_embed_tokens(text), _CONTEXT_LENGTH) for text in inputs),
                )
            finally:
                self._release_model(name, keep_alive)

        await self._run_watched(ex, work())
        return None if ex.call.disconnected or ex.call.aborted else result

    # -- model management

    async def _stream_status(
        self, ex: _Exchange, events: Iterable[dict[str, Any]], stream: bool, delay: float = 0.0
    ) -> None:
        items = list(events)
        if not stream:
            await ex.json(items[-1])
            return
        await ex.start(200, _NDJSON_CT)
        for event in items[:-1]:
            await ex.write(_ENCODE(event) + b"\n")
            if delay > 0:
                await asyncio.sleep(delay)
        await ex.finish(_ENCODE(items[-1]) + b"\n")

    async def _pull_failure(
        self, ex: _Exchange, stream: bool, message: str = "pull model manifest: file does not exist"
    ) -> None:
        # Ollama reports a failed pull or create in-band when streaming: 200, then an error line.
        if not stream:
            await ex.json({"error": message}, 500)
            return
        await ex.start(200, _NDJSON_CT)
        await ex.write(_ENCODE({"status": "pulling manifest"}) + b"\n")
        await ex.finish(_ENCODE({"error": message}) + b"\n")

    def _pullable(self, name: str) -> bool:
        allowed = self.config.pullable
        return allowed is None or name in {normalize_name(p) for p in allowed}

    async def _pull(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "PullRequest")
        model = _model_field(req, "PullRequest")
        stream = _field(req, "stream", bool, True, "PullRequest", "bool")
        if not model:
            raise _HTTPError(400, "invalid model name")
        name = normalize_name(model)
        if not self._pullable(name):
            await self._pull_failure(ex, stream)
            return
        events: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        size = _model_size(name)
        for layer, total in (
            ("model", size - 14_000),
            ("template", 1_429),
            ("license", 7_711),
            ("params", 96),
        ):
            digest = "sha256:" + _digest(f"{name}/{layer}")
            status = f"pulling {digest[7:19]}"
            events.append({"status": status, "digest": digest, "total": total})
            steps = (1, 2, 3, 4) if total > 1_000_000 else (4,)
            events.extend(
                {"status": status, "digest": digest, "total": total, "completed": total * s // 4}
                for s in steps
            )
        events += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        await self._run_watched(ex, self._stream_status(ex, events, stream, self.config.pull_step_delay))
        if not (ex.call.disconnected or ex.call.aborted):
            self._add_model(name, _ModelMeta(modified_at=datetime.now(UTC), root=name))
            self._notify()

    async def _create(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "CreateRequest")
        model = _model_field(req, "CreateRequest")
        stream = _field(req, "stream", bool, True, "CreateRequest", "bool")
        if not model:
            raise _HTTPError(400, "invalid model name")
        spec: dict[str, Any] = {"parameters": {}}
        modelfile = _field(req, "modelfile", str, None, "CreateRequest", "string")
        if modelfile is not None:  # the pre-0.5.5 API: a Modelfile in the body
            spec = _parse_modelfile(modelfile)
        for key in ("from", "system", "template"):
            value = _field(req, key, str, None, "CreateRequest", "string")
            if value:
                spec[key] = value
        spec["parameters"].update(_field(req, "parameters", dict, {}, "CreateRequest", "map[string]any"))
        base = spec.get("from")
        files = req.get("files")
        for digest in files.values() if isinstance(files, dict) else ():
            if digest not in self._blobs:
                raise _HTTPError(400, f"blob {digest} not found: upload it to /api/blobs first")
        if not base and not files:
            raise _HTTPError(
                400, "no FROM line" if modelfile is not None else "neither 'from' or 'files' was specified"
            )
        name = normalize_name(model)
        root, parent = name, ""
        if base and not base.startswith(("/", ".", "~", "sha256")):  # a model name, not a GGUF path
            base_name = normalize_name(base)
            if base_name not in self._known():  # Ollama would try to pull it and fail like this
                await self._pull_failure(ex, stream)
                return
            root, parent = self._meta_for(base_name).root, base_name
        events = [
            {"status": f"using existing layer sha256:{_digest(root + '/' + layer)}"}
            for layer in ("model", "template")
        ]
        # `quantize` (or the old `quantization`), as Ollama's createModel checks it: F16/F32 bases only.
        quantize = _field(req, "quantize", str, "", "CreateRequest", "string")
        quantize = (quantize or _field(req, "quantization", str, "", "CreateRequest", "string")).upper()
        quantization = ""
        if quantize:
            have = self._model_entry(parent)["details"]["quantization_level"] if parent else "F16"
            if quantize not in _QUANT_TYPES:
                await self._pull_failure(ex, stream, f"unsupported quantization type {quantize}")
                return
            if have not in ("F16", "F32"):
                await self._pull_failure(ex, stream, "quantization is only supported for F16 and F32 models")
                return
            if have != quantize:
                events[0] = {"status": f"quantizing {have} model to {quantize}"}
                events.append({"status": f"creating new layer sha256:{_digest(name + '/' + quantize)}"})
            quantization = quantize
        if spec.get("system") or spec["parameters"]:
            events.append({"status": f"creating new layer sha256:{_digest(name + '/config')}"})
        events += [{"status": "writing manifest"}, {"status": "success"}]
        meta = _ModelMeta(
            modified_at=datetime.now(UTC),
            root=root,
            parent=parent,
            system=spec.get("system", ""),
            template=spec.get("template") or "{{ .Prompt }}",
            parameters=spec["parameters"],
            quantization=quantization,
        )
        self._add_model(name, meta)
        await self._stream_status(ex, events, stream)

    async def _blob(self, ex: _Exchange, body: Any) -> None:
        digest = ex.call.path.removeprefix("/api/blobs/")
        if ex.call.method == "HEAD":
            await ex.respond(200 if digest in self._blobs else 404, None, b"")
            return
        actual = "sha256:" + hashlib.sha256(body or b"").hexdigest()
        if actual != digest:
            raise _HTTPError(400, f"digest mismatch, expected {digest!r}, got {actual!r}")
        self._blobs.add(digest)
        await ex.respond(201, None, b"")

    async def _copy(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "CopyRequest")
        source = _field(req, "source", str, "", "CopyRequest", "string")
        destination = _field(req, "destination", str, "", "CopyRequest", "string")
        if not source:
            raise _HTTPError(400, f'source "{source}" is invalid')
        if not destination:
            raise _HTTPError(400, f'destination "{destination}" is invalid')
        src = normalize_name(source)
        if src not in self._known():
            raise _HTTPError(404, f'model "{source}" not found')
        meta = dataclasses.replace(self._meta_for(src), modified_at=datetime.now(UTC))
        self._add_model(normalize_name(destination), meta)
        await ex.respond(200, None, b"")

    async def _delete(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "DeleteRequest")
        model = _model_field(req, "DeleteRequest")
        if not model:
            raise _HTTPError(400, f'name "{model}" is invalid')
        name = normalize_name(model)
        known = self._known()
        if name not in known:
            raise _HTTPError(404, f"model '{model}' not found")
        self.config.models.remove(known[name])
        self._meta.pop(name, None)
        self._loaded.pop(name, None)
        self._notify()
        await ex.respond(200, None, b"")

    async def _show(self, ex: _Exchange, body: Any) -> None:
        req = _require_object(body, "ShowRequest")
        model = _model_field(req, "ShowRequest")
        if not model:
            raise _HTTPError(400, "model is required")
        name = normalize_name(model)
        if name not in self._known():
            raise _HTTPError(404, f"model '{model}' not found")
        meta = self._meta_for(name)
        entry = self._model_entry(name)
        family = entry["details"]["family"]
        params = "\n".join(f"{k:<30} {v}" for k, v in meta.parameters.items())
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {name}\n\n"
            f"FROM /root/.ollama/models/blobs/sha256-{_digest(meta.root + '/model')}\n"
            f'TEMPLATE """{meta.template}"""\n'
            + (f'SYSTEM """{meta.system}"""\n' if meta.system else "")
            + "".join(f"PARAMETER {k} {v}\n" for k, v in meta.parameters.items())
        )
        await ex.json(
            {
                "license": "",
                "modelfile": modelfile,
                "parameters": params,
                "template": meta.template,
                "system": meta.system,
                "details": entry["details"],
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": int(_parameters(meta.root)[0]),
                    f"{family}.context_length": self.config.context_lengths.get(
                        name, 2048 if _is_embedding(meta.root) else 131072
                    ),
                    f"{family}.embedding_length": self.config.embed_dim if _is_embedding(meta.root) else 2048,
                },
                "capabilities": _capabilities(meta.root),
                "modified_at": _local_iso(meta.modified_at),
            }
        )

    async def _tags(self, ex: _Exchange, body: Any) -> None:
        newest_first = sorted(self._known(), key=lambda n: self._meta_for(n).modified_at, reverse=True)
        entries = [
            self._model_entry(name) | {"modified_at": _local_iso(self._meta_for(name).modified_at)}
            for name in newest_first
        ]
        await ex.json({"models": entries})

    async def _ps(self, ex: _Exchange, body: Any) -> None:
        models = []
        for name, expires in sorted(self.loaded.items(), key=lambda kv: kv[1], reverse=True):
            entry = self._model_entry(name)
            entry |= {
                "expires_at": _local_iso(expires),
                "size_vram": entry["size"],
                "context_length": _CONTEXT_LENGTH,
            }
            models.append(entry)
        await ex.json({"models": models})

    async def _version(self, ex: _Exchange, body: Any) -> None:
        await ex.json({"version": OLLAMA_VERSION})

    async def _root(self, ex: _Exchange, body: Any) -> None:
        await ex.respond(200, _TEXT_CT, b"Ollama is running")

    # -- control endpoints for process mode

    async def _fake_calls(self, ex: _Exchange, body: Any) -> None:
        await ex.json(self.calls)

    async def _fake_config(self, ex: _Exchange, body: Any) -> None:
        if ex.call.method == "POST":
            changes = _require_object(body, "FakeConfig")
            names = {f.name for f in dataclasses.fields(FakeConfig)}
            unknown = sorted(set(changes) - names)
            if unknown:
                raise _HTTPError(400, f"unknown config fields: {', '.join(unknown)}")
            try:
                updated = msgspec.convert(dataclasses.asdict(self.config) | changes, FakeConfig)
            except msgspec.ValidationError as exc:
                raise _HTTPError(400, str(exc)) from None
            for key in names:
                setattr(self.config, key, getattr(updated, key))
            self._wake_slots()  # a larger `parallel` frees queued generations
        await ex.json(self.config)

    async def _fake_reset(self, ex: _Exchange, body: Any) -> None:
        self.reset()
        await ex.json({"status": "ok"})


# ---------------------------------------------------------------------------- process mode


async def _serve_forever(fake: FakeOllama) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fake.start()
    # Like the real server (Go), no stop-the-world pauses over the startup heap: the fake upstream
    # must not add tens of milliseconds to the benchmark's TTFT of every contender.
    gc.collect()
    gc.freeze()
    print(f"fake ollama listening on {fake.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.ollama", description="Run the fake Ollama server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (see the ready line)")
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--token-interval", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--embed-call-cost", type=float, default=0.0)
    parser.add_argument("--embed-item-cost", type=float, default=0.0)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = FakeConfig(
        first_token_delay=args.first_token_delay,
        token_interval=args.token_interval,
        tokens=args.tokens,
        load_delay=args.load_delay,
        embed_call_cost=args.embed_call_cost,
        embed_item_cost=args.embed_item_cost,
        embed_dim=args.embed_dim,
        parallel=args.parallel,
    )
    fake = FakeOllama(config, host=args.host, port=args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_forever(fake))
    else:
        uvloop.run(_serve_forever(fake))


if __name__ == "__main__":
    main()
