"""Model lifecycle on the bus: the inventory, usage events, lifecycle events and the admin API.

The janitor (one per Ollama host) owns these. It writes one `ModelInfo` per model and host to the
KV bucket `llm_models` (key `<host>.<model>`, see `subjects.inventory_key`), learns last use from
the `UsageEvent` every worker publishes after a request, publishes a `ModelEvent` for every
lifecycle step it takes, and answers the admin API (`llm.admin.[<host>.]<verb>`, a NATS micro
service). Admin replies are the result struct as JSON; a failure carries the micro-service error
headers (`Nats-Service-Error-Code` = the HTTP status) and an `ErrorBody` as the payload.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from contracts.base import validate_model
from contracts.errors import ErrorCode, LlmbusError
from contracts.subjects import HOST_NAME

# available: on the host's disk; loaded: in (V)RAM; pulling/creating: on its way (see `progress`);
# failed: wanted by models.toml but its pull or create failed (see `error`).
ModelState = Literal["available", "loaded", "pulling", "creating", "failed"]
READY_STATES = frozenset({"available", "loaded"})

UnloadReason = Literal["idle", "memory_budget", "host_memory", "admin"]
Op = Literal["pull", "create", "copy", "delete", "load", "unload"]


class Progress(msgspec.Struct):
    """How far a pull (or create) is: bytes over every layer seen so far."""

    status: str
    completed: int = 0
    total: int = 0

    @property
    def percent(self) -> float | None:
        return round(100 * self.completed / self.total, 1) if self.total else None


class ModelInfo(msgspec.Struct, kw_only=True):
    """One model on one host: the value of `<host>.<model>` in the `llm_models` bucket."""

    host: str
    model: str  # Ollama's canonical name, e.g. `llama3.2:1b`
    state: ModelState
    size: int = 0  # bytes on disk
    size_vram: int = 0  # bytes in GPU memory while loaded (size - size_vram runs on the CPU)
    loaded: bool = False
    expires_at: float | None = None  # Unix seconds: Ollama unloads it by itself then
    last_used: float | None = None  # Unix seconds: last request seen (usage event or /api/ps)
    pinned: bool = False  # never unloaded by the janitor
    warm: bool = False  # loaded at start
    idle_ttl_s: float | None = None  # unloaded after this long without a request; None = never
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    context_length: int | None = None  # tokens it was trained for (`/api/show`: `<arch>.context_length`)
    digest: str | None = None
    modelfile_digest: str | None = None  # sha256 of the Modelfile it was created from
    progress: Progress | None = None
    error: str | None = None
    updated_at: float = 0.0  # Unix seconds of the last change

    @property
    def ready(self) -> bool:
        return self.state in READY_STATES


class UsageContent(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What was asked and answered, on a `UsageEvent` only with `LLMBUS_LEDGER_CONTENT=on`.

    Each field is cut to `LLMBUS_LEDGER_CONTENT_MAX_BYTES` of UTF-8 (`truncated` then says so).
    """

    prompt: str  # JSON: the messages (`system` first, a `prompt` as one user message), images counted
    answer: str  # the answer's text as the client got it (across take-overs)
    truncated: bool = False


class UsageEvent(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Published on `llm.evt.usage.<model>` after every request's terminal event.

    Core NATS (the janitor's last use), and kept in the `LLM_USAGE` stream once the ledger created
    it (one per request id: `Nats-Msg-Id: <id>.usage`), which the ledger records (docs/ledger.md).
    """

    model: str  # the model that answered
    kind: str  # the request family: `generate`, `embed`, ...
    request_id: str
    at: float  # Unix seconds, when the request ended
    outcome: str  # `done`, or the error code
    duration_ms: float  # from when this attempt started to its terminal event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Who asked (the edge's `Llmbus-Origin`; empty for a direct publisher that sent none).
    tenant: str = ""
    key_id: str = ""
    api: str = ""
    requested_model: str = ""
    route: str = ""
    host: str = ""  # the model server that answered (host[:port] of its URL)
    attempt: int = 1  # deliveries it took (2+: a worker took over after a crash)
    queued_ms: float | None = None  # from acceptance (or storage in LLM_REQ) to this attempt's start
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    trace_id: str = ""
    accepted_at: float | None = None  # Unix seconds, when the edge accepted it
    content: UsageContent | None = None  # prompt and answer (generation, LLMBUS_LEDGER_CONTENT=on)


class _ModelEvent(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    host: str
    model: str
    op: Op


class StatusLine(msgspec.Struct, omit_defaults=True):
    """One status line of the model server's pull or create, as Ollama sends it (one layer's bytes)."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


class OpProgress(_ModelEvent, tag="progress"):
    """A step of a running pull or create (Ollama's status lines, summed over layers)."""

    progress: Progress
    line: StatusLine | None = None  # the line this step came from (Ollama's API relays it)


class OpDone(_ModelEvent, tag="done"):
    """An operation finished; an unload says why."""

    reason: UnloadReason | None = None
    info: ModelInfo | None = None


class OpError(_ModelEvent, tag="error"):
    code: ErrorCode
    message: str


# On `llm.evt.model.<host>.<model>` for everything the janitor does, and on the `progress` subject
# of the admin request that started a pull or create; `done` and `error` are terminal.
ModelEvent = OpProgress | OpDone | OpError


# -- admin API requests (`llm.admin.[<host>.]<verb>`) and replies


def _check_model(model: str) -> None:
    validate_model(model)


class ModelRef(msgspec.Struct, forbid_unknown_fields=True):
    """`show`, `delete`, `unload`."""

    model: str

    def validate(self) -> None:
        _check_model(self.model)


class PullRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """`pull`: progress events go to `progress` (subscribe before sending) and `llm.evt.model.*`."""

    model: str
    progress: str | None = None

    def validate(self) -> None:
        _check_model(self.model)


class CreateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """`create`: a model from the text of a Modelfile (FROM a model name on the host), or from the
    fields of Ollama's structured create request (`from`, `files`, ...: blobs already on the host)."""

    model: str
    modelfile: str = ""
    progress: str | None = None
    from_: str = msgspec.field(default="", name="from")
    files: dict[str, str] | None = None  # file name -> `sha256:<hex>` of a blob on the host
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None  # e.g. `q4_K_M`: the host quantizes an F16/F32 base

    @property
    def structured(self) -> bool:
        fields = (self.from_, self.files, self.adapters, self.template, self.system, self.license)
        return any(fields) or bool(self.parameters or self.messages)

    def validate(self) -> None:
        _check_model(self.model)
        if self.modelfile.strip() and self.structured:
            raise LlmbusError(ErrorCode.BAD_REQUEST, "give either `modelfile` or `from`/`files`, not both")
        if not self.modelfile.strip() and not (self.from_ or self.files):
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`modelfile`, `from` or `files` is required")


class CopyRequest(msgspec.Struct, forbid_unknown_fields=True):
    source: str
    destination: str

    def validate(self) -> None:
        _check_model(self.source)
        _check_model(self.destination)


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """`load`: keep it loaded `keep_alive_s` seconds (-1 = until unloaded; default: its idle TTL)."""

    model: str
    keep_alive_s: float | None = None

    def validate(self) -> None:
        _check_model(self.model)


class OpAccepted(msgspec.Struct):
    """The reply to `pull` and `create`: the work runs on; its events say how it ends."""

    host: str
    model: str
    op: Op


class ModelList(msgspec.Struct):
    """The reply to `list` and `ps`: one host's models."""

    host: str
    models: list[ModelInfo]


class ModelDetails(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The reply to `show`."""

    host: str
    model: str
    modelfile: str = ""
    parameters: str = ""
    template: str = ""
    system: str = ""
    capabilities: list[str] = msgspec.field(default_factory=list)
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    model_info: dict[str, Any] = msgspec.field(default_factory=dict)
    modified_at: str = ""  # RFC 3339: when the model last changed on the host (as the host says)
    info: ModelInfo | None = None


ADMIN_VERBS = ("list", "ps", "show", "pull", "create", "copy", "delete", "load", "unload")


def validate_host(host: str) -> None:
    if not HOST_NAME.match(host):
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid host name {host[:64]!r}")


def canonical_model(name: str) -> str:
    """Ollama's canonical short name: lowercase, default registry dropped, `:latest` added.

    `llama3.2` and `library/llama3.2:latest` are the same model; the inventory is keyed by this.
    """
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        name = name.removeprefix(prefix)
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name
