"""Configuration from environment variables, all prefixed `LLMBUS_`.

One struct for every service keeps names and defaults in one place; docs/operations.md lists them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Annotated, Literal, get_origin

import msgspec

PREFIX = "LLMBUS_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    nats_port: int = 4222  # the embedded server started by `llmbus up`
    # NATS user of this process (docs/operations.md "Security: the bus"). Empty: the service's own
    # user, its password read from `nats_credentials` (default `<data_dir>/nats/credentials.json`,
    # written by the embedded server); no such file: connect without credentials.
    nats_user: str = ""
    nats_password: str = ""
    nats_credentials: str = ""
    # TLS to NATS (a `tls://` URL): the CA that signed the server's certificate, and a client
    # certificate and key when the server verifies clients. Empty: the system's CAs, no client cert.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    ollama_url: str = "http://127.0.0.1:11434"
    # The model server this process calls: its API kind and URL (empty: `ollama_url`). Several
    # hosts: one generator per host, each with its own `generate_models` (docs/operations.md).
    backend: Literal["ollama", "openai"] = "ollama"
    backend_url: str = ""
    backend_api_key: str = ""  # sent as a bearer token to OpenAI-compatible servers that want one
    backend_stream: bool = True  # false: one JSON answer per call, for servers that cannot stream
    embed_backend_url: str = ""  # where embeddings go, same kind; empty: the backend URL
    generate_models: list[str] = []  # the models this generator serves (comma-separated); none: every model
    local: Literal["auto", "on", "off"] = "auto"  # `llmbus up`: embedded llama.cpp when Ollama is down
    local_max_tokens: int = 256  # the embedded server's answer limit for requests that set none
    local_model: str = ""  # a GGUF file for the embedded llama.cpp; empty: SmolLM2-135M-Instruct
    local_model_name: str = ""  # the name it is served under; empty: the file name without `.gguf`
    local_cache: str = ""  # where the embedded models are kept; empty: `<data_dir>/models`
    local_chat_port: int = 0  # `llmbus local` ports; 0: a free port (`llmbus up` picks and passes them)
    local_embed_port: int = 0
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: str = ".llmbus"  # embedded NATS storage, relative to the working directory
    concurrency: int = 16  # requests one worker process runs at once
    # Batch lines (the batch lane) one worker runs at once, on top of `concurrency` but only while
    # interactive work leaves one of its slots free; 0: this worker takes no batch work.
    batch_slots: int = 1
    ack_wait_s: float = 30.0  # JetStream redelivers a request whose worker is silent this long
    max_deliver: int = 5
    dedupe_window_s: float = 120.0  # an Idempotency-Key / Nats-Msg-Id is remembered this long
    event_max_age_s: float = 600.0  # how long request events stay replayable in LLM_OUT
    request_timeout_s: float = 600.0  # upper bound of any request's deadline
    max_body_bytes: int = 1_048_576
    max_image_bytes: int = 10_485_760  # one image, decoded (data: URL, Ollama's images, fetched): else 413
    # OpenAI `image_url` with an http(s) URL: fetched by the edge only from these hosts (comma-separated
    # `host` or `host:port`); empty: refused with 400 unsupported. Never from a non-public address ...
    image_fetch_hosts: list[str] = []
    image_fetch_allow_private: bool = False  # ... unless this says so (tests, a trusted local server)
    image_fetch_timeout_s: float = 10.0  # a whole fetch, redirects included
    http_header_timeout_s: float = 10.0  # a request's headers must arrive within this (else 408)
    http_body_timeout_s: float = 30.0  # ... and its body within this after them (else 408)
    tasks_dir: str = ""  # task definitions (`*.toml`) the edge serves; empty: infra/tasks in the source tree
    backend_connect_timeout_s: float = 5.0
    # Before the first token, a refused connection, a 5xx or no first token within this long is
    # retried (after it, the request ends with backend_error); docs/reliability.md.
    backend_first_token_timeout_s: float = 300.0
    backend_retries: int = 3  # retries before the first token, with exponential backoff ...
    backend_retry_base_s: float = 0.25  # ... starting here ...
    backend_retry_max_s: float = 5.0  # ... capped here, and always within the request's deadline
    stream_replicas: int = 1  # JetStream replicas of every stream (3 on a 3-node cluster)
    dlq_max_age_s: float = 7 * 86400.0  # how long dead letters stay in LLM_DLQ
    shutdown_grace_s: float = 20.0  # SIGTERM lets in-flight requests finish this long
    # Routing (`"model": "auto"`, docs/routing.md): the routes file, re-read when it changes, and how
    # long the edge waits for the classifier before it sends the request to the default route's model.
    routes_file: str = "infra/routes.toml"
    route_wait_s: float = 2.0
    # The embedder (docs/embeddings.md): many small requests in flight, merged into backend calls.
    embed_concurrency: int = 256  # embed requests one embedder process holds at once
    embed_batching: bool = True  # merge concurrent requests for one model into one backend call ...
    embed_max_batch: int = 64  # ... of at most this many inputs (a bigger request is split) ...
    embed_max_wait_ms: float = 5.0  # ... waiting at most this long for more to join ...
    embed_max_calls: int = 1  # ... with this many calls per model in flight (Ollama runs one at a time)
    embed_max_inputs: int = 256  # inputs in one request (413 request_too_large above)
    embed_max_input_chars: int = 32_768  # characters in one input (400 prompt_too_large above)
    embed_cache_ttl_s: float = 86_400.0  # how long a cached vector lives; 0 turns the cache off
    embed_cache_max_bytes: int = 256 * 1024 * 1024  # the cache bucket's size; oldest entries go first
    # The edge's response cache (docs/cache.md): reproducible answers replayed from a shared KV bucket.
    response_cache: Literal["off", "exact", "semantic"] = "exact"  # a tenant or a request may override
    response_cache_ttl_s: float = 3600.0  # how long an answer is served after it was stored
    response_cache_max_bytes: int = 256 * 1024 * 1024  # the bucket's size; least recently used go first
    response_cache_max_entry_bytes: int = 512 * 1024  # a bigger answer is not stored
    semantic_threshold: float = 0.95  # cosine similarity a semantic hit needs
    semantic_embed_model: str = "nomic-embed-text"  # the embedder's model for semantic keys
    # The janitor (docs/operations.md "Models"): one per Ollama host; the desired state it keeps.
    # The edge is ready only once a janitor's inventory lists a model it can serve, so `GET
    # /v1/models` is never empty after readiness (`llmbus up` sets it: its stack has a janitor).
    ready_needs_models: bool = False
    janitor_host: str = "local"  # this janitor's host name: inventory key and admin subject
    models_file: str = "infra/models.toml"  # models.toml, re-read when it changes
    janitor_interval_s: float = 5.0  # how often it reads /api/ps and applies the unload policy
    janitor_reconcile_s: float = 60.0  # how often it re-checks that every desired model is there
    edge_model_check: bool = True  # the edge refuses a model no janitor lists (once one has written)
    # Edge admission (docs/operations.md "Admission"): API keys and tenant limits, shared by every
    # edge replica through the `llm_admission` KV bucket; overload refused before it queues.
    auth: Literal["on", "off"] = "off"  # on: every API route wants `Authorization: Bearer <key>`
    tenants_file: str = "infra/tenants.toml"  # tenants, their limits and hashed keys
    cors_origins: list[str] = []  # origins allowed by CORS, comma-separated ("*": any); none: CORS closed
    max_queue: int = 1000  # a model's backlog (queued + running) above this: 503 queue_full; 0 = off
    queue_check_s: float = 0.5  # how old the edge's view of the backlog may get
    context_tokens: int = 8192  # a prompt's estimated tokens above this (or num_ctx): prompt_too_large
    max_output_tokens: int = 4096  # num_predict / max_tokens asked above this (or -1) is capped to it
    lease_ttl_s: float = 30.0  # an in-flight slot of a crashed edge is freed after this long
    # The seeds' APIs the edge also serves, at their own paths (docs/migration.md), comma-separated:
    # badges, router, queued, shared, simple. None by default.
    dialects: list[str] = []
    # The model of a request that names none (the simple and queued dialects); empty: the routes
    # file's default route's model.
    default_model: str = ""
    # Images for vision models, shrunk at the edge before the request is queued (every API):
    # the longest side bounded to this many pixels (0: any size), and, with a quality (1-95; 0: off),
    # re-encoded as JPEG. A result is kept only when it is smaller (docs/operations.md "Images").
    image_max_side: int = 0
    image_quality: int = 0
    log_level: str = "info"
    # json: one JSON object per line; text: short lines for people; auto: text on a terminal, else json.
    log_format: Literal["auto", "json", "text"] = "auto"
    # Who this process is, as `/health/ready` reports it (`llmbus up` checks that the edge answering
    # on its port is the one it started); empty: a random id per process.
    instance_id: str = ""
    # A worker process serves Prometheus text at http://<http_host>:<metrics_port>/metrics; 0 = off
    # (the edge always serves /metrics on its own port). docs/operations.md lists the metrics.
    metrics_port: int = 0
    # Which process of its role this is (0: the first); `llmbus up` numbers the extra edges and
    # generators it starts, which picks their metrics ports (services/runtime/scrape_targets.py).
    replica: Annotated[int, msgspec.Meta(ge=0)] = 0
    # `llmbus up`: edge processes sharing the HTTP port (SO_REUSEPORT: the kernel spreads the
    # connections) and generator processes sharing the request queue (docs/operations.md, sizing).
    edge_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    generators: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # The ledger (docs/ledger.md): its database (empty: SQLite at <data_dir>/ledger.db; or
    # postgresql://user:password@host/db), rows per transaction, and how long LLM_USAGE keeps events.
    database_url: str = ""
    ledger_batch: int = 512
    usage_max_age_s: float = 7 * 86400.0
    # Prompts and answers in the ledger (docs/ledger.md "Content"): on makes the generators put them
    # on usage events and the ledger store them, each cut to max_bytes, deleted after retention_s.
    ledger_content: Literal["on", "off"] = "off"
    ledger_content_max_bytes: int = 64 * 1024
    ledger_content_retention_s: float = 30 * 86400.0
    # Batches (docs/batches.md): lines per input file, bytes per uploaded file, lines a batcher
    # runs at once, and batches one tenant may have unfinished.
    batch_max_lines: int = 50_000
    batch_max_file_bytes: int = 64 * 1024 * 1024
    batch_concurrency: int = 16
    batch_max_active: int = 10

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        fields = set(cls.__struct_fields__)
        raw: dict[str, object] = {
            key[len(PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(PREFIX) and key[len(PREFIX) :].lower() in fields
        }
        raw.update(overrides)
        for name in LIST_SETTINGS:  # the environment's form of a list: comma-separated
            if isinstance(value := raw.get(name), str):
                raw[name] = [item.strip() for item in value.split(",") if item.strip()]
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"invalid configuration: {exc} (environment variables {PREFIX}*)") from None

    @classmethod
    def sources(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Where each setting comes from: `environment (LLMBUS_X)` or `default`."""
        env = os.environ if environ is None else environ
        return {
            name: f"environment ({PREFIX}{name.upper()})" if PREFIX + name.upper() in env else "default"
            for name in cls.__struct_fields__
        }

    @property
    def generate_url(self) -> str:
        return self.backend_url or self.ollama_url

    @property
    def embed_url(self) -> str:
        return self.embed_backend_url or self.generate_url

    def text(self, name: str) -> str:
        """A setting's value as its environment variable spells it (a list comma-separated)."""
        value = getattr(self, name)
        return ",".join(value) if isinstance(value, list) else str(value)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {PREFIX + name.upper(): self.text(name) for name in self.__struct_fields__}


# Settings that are lists: an environment variable gives one comma-separated.
LIST_SETTINGS = frozenset(f.name for f in msgspec.structs.fields(Settings) if get_origin(f.type) is list)


# `LLMBUS_*` variables that are not settings but are known: compose's inputs, one per service, that
# it hands to each container as LLMBUS_NATS_PASSWORD (compose.yml).
_NOT_SETTINGS = ("LLMBUS_NATS_PASSWORD_",)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per `LLMBUS_*` variable that no setting reads, naming the closest known one:
    a mistyped name (`LLMBUS_CONCURENCY`) would otherwise be silently ignored."""
    env = os.environ if environ is None else environ
    known = [PREFIX + name.upper() for name in Settings.__struct_fields__]
    warnings = []
    for key in sorted(env):
        if not key.startswith(PREFIX) or key in known or key.startswith(_NOT_SETTINGS):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (`llmbus config` lists every setting)"
        warnings.append(f"unknown variable {key} is ignored{hint}")
    return warnings


# Which settings each command reads, for its `--help` and `llmbus config`; every setting is in a group
# (a test checks), so a new one cannot be left out of the help.
GROUPS: dict[str, tuple[str, ...]] = {
    "bus": (
        "nats_url", "nats_user", "nats_password", "nats_credentials", "nats_tls_ca", "nats_tls_cert",
        "nats_tls_key", "data_dir", "stream_replicas", "dedupe_window_s", "event_max_age_s", "dlq_max_age_s",
    ),
    "process": ("log_level", "log_format", "instance_id", "metrics_port", "replica", "shutdown_grace_s"),
    "worker": ("concurrency", "batch_slots", "ack_wait_s", "max_deliver", "request_timeout_s"),
    "backend": (
        "ollama_url", "backend", "backend_url", "backend_api_key", "backend_stream", "embed_backend_url",
        "backend_connect_timeout_s", "backend_first_token_timeout_s", "backend_retries",
        "backend_retry_base_s", "backend_retry_max_s",
    ),
    "generator": ("generate_models",),
    "embedder": (
        "embed_concurrency", "embed_batching", "embed_max_batch", "embed_max_wait_ms", "embed_max_calls",
        "embed_max_inputs", "embed_max_input_chars", "embed_cache_ttl_s", "embed_cache_max_bytes",
    ),
    "cache": (
        "response_cache", "response_cache_ttl_s", "response_cache_max_bytes",
        "response_cache_max_entry_bytes", "semantic_threshold", "semantic_embed_model",
    ),
    "routing": ("routes_file", "route_wait_s"),
    "janitor": ("janitor_host", "models_file", "janitor_interval_s", "janitor_reconcile_s"),
    "edge": (
        "http_host", "http_port", "max_body_bytes", "http_header_timeout_s", "http_body_timeout_s",
        "max_image_bytes", "image_fetch_hosts", "image_fetch_allow_private", "image_fetch_timeout_s",
        "tasks_dir", "edge_model_check", "auth", "tenants_file", "cors_origins", "ready_needs_models",
        "max_queue", "queue_check_s", "context_tokens", "max_output_tokens", "lease_ttl_s", "dialects",
        "default_model", "image_max_side", "image_quality", "edge_workers",
    ),
    "local": (
        "local", "local_max_tokens", "local_model", "local_model_name", "local_cache", "local_chat_port",
        "local_embed_port",
    ),
    "ledger": ("database_url", "ledger_batch", "usage_max_age_s"),
    "content": ("ledger_content", "ledger_content_max_bytes", "ledger_content_retention_s"),
    "batches": ("batch_max_lines", "batch_max_file_bytes", "batch_concurrency", "batch_max_active"),
    "up": ("nats_port", "generators"),
}  # fmt: skip
_WORKER = ("bus", "process", "worker", "backend")
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "up": tuple(GROUPS),
    "edge": ("bus", "process", "edge", "routing", "worker", "batches", "cache"),
    "batcher": ("bus", "process", "worker", "batches"),
    "generator": (*_WORKER, "generator", "content"),
    "embedder": (*_WORKER, "embedder"),
    "classifier": (*_WORKER, "routing"),
    "janitor": (*_WORKER, "janitor"),
    "ledger": ("bus", "process", "ledger", "content"),
    "erase": ("bus",),
    "usage": ("bus",),
    "stats": ("bus",),
    "local": ("process", "local"),
    "models": ("bus",),
    "dlq": ("bus",),
    "config": tuple(GROUPS),
}


def variables_help(command: str) -> str:
    """The `--help` epilog of `command`: each variable it reads and its default."""
    defaults = Settings()
    lines = ["environment variables read (default in brackets):"]
    for group in COMMAND_GROUPS.get(command, ()):
        for name in GROUPS[group]:
            default = getattr(defaults, name)
            shown = "" if name.endswith("password") or name.endswith("api_key") else str(default)
            lines.append(f"  {PREFIX}{name.upper():<34} [{shown}]")
    return "\n".join(lines)
