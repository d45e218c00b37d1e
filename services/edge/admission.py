"""Edge admission: who is calling, and whether their request may queue. One place for every API.

* `authenticate` is an app-wide Litestar guard: it maps `Authorization: Bearer <key>` to a tenant
  (401 `unauthorized`), refuses admin routes to non-admin tenants (403 `forbidden`) and leaves the
  tenant in a context variable for the rest of the request.
* `Admission.admit` runs inside `Dispatcher.submit`, which every route family (native `/v1`,
  `/openai/v1`, `/ollama`'s `/api/*`, tasks, embed) goes through before anything is published:
  model allowed (403), prompt within the context (400 `prompt_too_large`; the model's trained
  context from the janitors' inventory unless the request sets `num_ctx`), `num_predict` capped
  (and set to the cap when the client sends none), the model's backlog under its bound (503
  `queue_full`), then the tenant's shared limits (429 `rate_limited`, services/edge/quota.py). It
  returns a `Ticket` that the request's event feed hands back when it closes, with the tokens the
  answer used.
* `/v1/classify` is not a queued request: it takes `check_model` and `hold` (the same 403 and 429)
  and gives its ticket back when the classifier answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from contextvars import ContextVar
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from nats.js import JetStreamContext

from contracts import Accepted, EmbedRequest, ErrorCode, GenerateRequest, LlmbusError
from services.edge.backlog import Backlog, Slot
from services.edge.quota import Quota, open_bucket
from services.edge.tenants import ANONYMOUS, Keyring, Tenant, TenantsFile
from services.runtime.events import RawEvent
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

# The tenant of the request being handled (set by `authenticate`; ANONYMOUS with auth off).
caller: ContextVar[Tenant] = ContextVar("llmbus_tenant", default=ANONYMOUS)

# Routes anyone may call with auth on: probes, metrics, the OpenAPI document, the demo page.
PUBLIC_PATHS = frozenset({"/", "/health/live", "/health/ready", "/metrics", "/api/version"})
PUBLIC_PREFIXES = ("/schema", "/static/")
ADMIN = "admin"  # a route handler with `opt={"admin": True}` needs an admin tenant

CHARS_PER_TOKEN = 4  # the usual estimate for English text with BPE tokenizers


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    admission: Admission | None = getattr(connection.app.state, "admission", None)
    keyring = admission.keyring if admission is not None else None
    if keyring is None:
        return
    path = connection.scope["path"]
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return
    scheme, _, key = connection.headers.get("authorization", "").partition(" ")
    tenant = keyring.find(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise LlmbusError(
            ErrorCode.UNAUTHORIZED, "a valid API key is required: `Authorization: Bearer <key>`"
        )
    if handler.opt.get(ADMIN) and not tenant.admin:
        raise LlmbusError(ErrorCode.FORBIDDEN, "this route needs an admin key")
    caller.set(tenant)
    connection.scope.setdefault("state", {})["tenant"] = tenant.name  # for logs, never the key


def request_id_for_key(key: str) -> str:
    """The request id an `Idempotency-Key` becomes: the key itself with auth off, else the key
    prefixed with a tag of the tenant, so two tenants using the same key never meet."""
    tenant = caller.get()
    if not tenant.name:
        return key
    tag = hashlib.blake2b(tenant.name.encode(), digest_size=4).hexdigest()
    if len(key) <= 119:
        return f"{tag}-{key}"
    return f"{tag}-" + hashlib.blake2b(key.encode(), digest_size=24).hexdigest()


class _Usage(msgspec.Struct):
    total_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Terminal(msgspec.Struct):
    usage: _Usage | None = None


_decode_terminal = msgspec.json.Decoder(_Terminal).decode


class Ticket:
    """One admitted request's hold on its tenant's limits, given back once when its feed closes."""

    __slots__ = ("admission", "lease", "released", "tenant")

    def __init__(self, admission: Admission, tenant: Tenant, lease: str) -> None:
        self.admission = admission
        self.tenant = tenant
        self.lease = lease
        self.released = False

    def release(self, last: RawEvent | None) -> None:
        """Gives the hold back, counting the tokens the request's terminal event (`last`) reports."""
        tokens = 0
        if last is not None and last[0].type in ("done", "embeddings"):
            tokens = spent_tokens(last[1])
        self.give_back(tokens)

    def give_back(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            self.admission.release_later(self, tokens)


def spent_tokens(answer: bytes) -> int:
    """The tokens a terminal event or a classify reply reports in its `usage` (0 without one)."""
    try:
        usage = _decode_terminal(answer).usage
    except msgspec.DecodeError:
        return 0
    return 0 if usage is None else usage.total_tokens or usage.prompt_tokens + usage.completion_tokens


class Admission:
    def __init__(
        self, settings: Settings, js: JetStreamContext, inventory: InventoryView | None = None
    ) -> None:
        self.settings = settings
        self.js = js
        self.inventory = inventory  # the janitors' models: each one's context length
        # Re-read when it changes (a broken tenants file stops the edge at start, not later).
        self.tenants = TenantsFile(settings.tenants_file) if settings.auth == "on" else None
        self.backlog = Backlog(js, settings.max_queue, settings.queue_check_s)
        self.quota: Quota | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._opening = asyncio.Lock()

    @property
    def keyring(self) -> Keyring | None:
        """The tenants as of now (None with auth off)."""
        return self.tenants.current() if self.tenants is not None else None

    async def start(self) -> Admission:
        keyring = self.keyring
        if keyring is not None and any(t.limited for t in keyring.tenants.values()):
            await self._open_quota()
        if self.backlog.bound > 0:
            await self.backlog.prime()
        return self

    async def stop(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 1.0)
        await self.backlog.stop()
        if self.quota is not None:
            await self.quota.stop()

    async def admit(
        self, request: GenerateRequest | EmbedRequest, subject: str
    ) -> tuple[GenerateRequest | EmbedRequest, Ticket | None, Slot]:
        """The request as it may be published (`num_predict` capped), its ticket and its place in
        the backlog (`slot.stored()` once published, else `slot.dropped()`); or raises."""
        self.check_model(request.model)
        if isinstance(request, GenerateRequest):
            request = self._fit(request)
        slot = await self.backlog.admit(subject)  # `llm.req.route` if routed: the classifier's queue
        try:
            return request, await self.hold(), slot
        except BaseException:
            slot.dropped()
            raise

    def check_model(self, model: str) -> None:
        """403 `forbidden` for a model outside the caller's `models` globs."""
        if not caller.get().allows(model):
            raise LlmbusError(ErrorCode.FORBIDDEN, f"this key may not use model {model[:64]!r}")

    async def hold(self) -> Ticket | None:
        """Takes one request of the caller's limits (429 `rate_limited`); None when it has none.

        For calls that do not go through `admit` (`/v1/classify`): give it back with
        `ticket.release(None)` when the call ends.
        """
        tenant = caller.get()
        if not tenant.limited:
            return None
        quota = self.quota or await self._open_quota()  # a reload gave a tenant its first limits
        ticket = Ticket(self, tenant, uuid.uuid4().hex)
        await quota.acquire(tenant, ticket.lease)
        return ticket

    async def reopen(self) -> None:
        """After a reconnect: re-creates the counters' bucket (in memory: a restarted NATS lost it)."""
        if self.quota is not None:
            await open_bucket(self.js)

    async def _open_quota(self) -> Quota:
        async with self._opening:
            if self.quota is None:
                self.quota = Quota(await open_bucket(self.js), self.settings.lease_ttl_s)
            return self.quota

    def context_of(self, model: str) -> int | None:
        """The model's trained context from the janitors' inventory (the smallest over its hosts)."""
        if self.inventory is None:
            return None
        known = [info.context_length for info in self.inventory.lookup(model) if info.context_length]
        return min(known) if known else None

    def _fit(self, request: GenerateRequest) -> GenerateRequest:
        options = request.options
        trained = self.context_of(request.model)
        # The context the backend will read the prompt with: the request's `num_ctx`, else what the
        # server loads models with (`LLMBUS_CONTEXT_TOKENS`, set it to Ollama's
        # OLLAMA_CONTEXT_LENGTH); never more than the model was trained for, as Ollama lowers it.
        served = options.num_ctx or self.settings.context_tokens
        context = min(served, trained) if served and trained else served or trained or 0
        tokens = estimate_tokens(request)
        if context > 0 and tokens > context:
            raise LlmbusError(
                ErrorCode.PROMPT_TOO_LARGE,
                f"the prompt is about {tokens} tokens, over the model's context of {context}; "
                "shorten or summarise it",
            )
        cap = self.settings.max_output_tokens
        # No max_tokens is Ollama's -1 (until the model stops, or forever with context shift):
        # capped like an explicit -1, so leaving it out is no way around the cap.
        if cap > 0 and (options.num_predict is None or options.num_predict < 0 or options.num_predict > cap):
            request = msgspec.structs.replace(
                request, options=msgspec.structs.replace(options, num_predict=cap)
            )
        return request

    def owns(self, accepted: Accepted | None) -> bool:
        """Whether the caller may read or cancel the request `accepted` records."""
        if self.is_admin():
            return True
        return accepted is not None and accepted.tenant == caller.get().name

    def is_admin(self) -> bool:
        """Whether the caller holds an admin key (everyone does with auth off)."""
        return self.tenants is None or caller.get().admin

    def tenant_name(self) -> str:
        return caller.get().name

    def release_later(self, ticket: Ticket, tokens: int) -> None:
        if self.quota is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(ticket, tokens))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, ticket: Ticket, tokens: int) -> None:
        assert self.quota is not None
        try:
            await self.quota.release(ticket.tenant, ticket.lease, tokens)
        except Exception as exc:  # the lease expires on its own
            log.warning("could not release an in-flight lease: %s", exc)


def estimate_tokens(request: GenerateRequest) -> int:
    """Characters / 4 over everything the model reads (images are not counted)."""
    chars = len(request.prompt or "") + len(request.system or "")
    for message in request.messages or ():
        chars += len(message.content)
    return -(-chars // CHARS_PER_TOKEN)
