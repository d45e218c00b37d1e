"""Edge admission: who is calling, and whether their request may queue. One place for every API.

* `authenticate` is an app-wide Litestar guard: it maps `Authorization: Bearer <key>` to a tenant
  (401 `unauthorized`), refuses admin routes to non-admin tenants (403 `forbidden`) and leaves the
  tenant in a context variable for the rest of the request.
* `Admission.admit` runs inside `Dispatcher.submit`, which every route family (native `/v1`,
  `/openai/v1`, `/ollama`'s `/api/*`, tasks, embed) goes through before anything is published:
  model allowed (403), prompt within the context (400 `prompt_too_large`), `num_predict` capped,
  the model's backlog under its bound (503 `queue_full`), then the tenant's shared limits (429
  `rate_limited`, services/edge/quota.py). It returns a `Ticket` that the request's event feed
  hands back when it closes, with the tokens the answer used.
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
from services.edge.backlog import Backlog
from services.edge.quota import Quota, open_bucket
from services.edge.tenants import ANONYMOUS, Keyring, Tenant
from services.runtime.events import RawEvent
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
    if admission is None or admission.keyring is None:
        return
    path = connection.scope["path"]
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return
    scheme, _, key = connection.headers.get("authorization", "").partition(" ")
    tenant = admission.keyring.find(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
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
        if self.released:
            return
        self.released = True
        tokens = 0
        if last is not None and last[0].type in ("done", "embeddings"):
            with contextlib.suppress(msgspec.DecodeError):
                usage = _decode_terminal(last[1]).usage
                if usage is not None:
                    tokens = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        self.admission.release_later(self, tokens)


class Admission:
    def __init__(self, settings: Settings, js: JetStreamContext) -> None:
        self.settings = settings
        self.js = js
        self.keyring = Keyring.load(settings.tenants_file) if settings.auth == "on" else None
        self.backlog = Backlog(js, settings.max_queue, settings.queue_check_s)
        self.quota: Quota | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> Admission:
        if self.keyring is not None and any(t.limited for t in self.keyring.tenants.values()):
            self.quota = Quota(await open_bucket(self.js), self.settings.lease_ttl_s)
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
    ) -> tuple[GenerateRequest | EmbedRequest, Ticket | None]:
        """The request as it may be published (`num_predict` capped), and its ticket; or raises."""
        tenant = caller.get()
        if not tenant.allows(request.model):
            raise LlmbusError(ErrorCode.FORBIDDEN, f"this key may not use model {request.model[:64]!r}")
        if isinstance(request, GenerateRequest):
            request = self._fit(request)
        self.backlog.check(subject)  # `llm.req.route` for a routed request: the classifier's queue
        if self.quota is None or not tenant.limited:
            return request, None
        ticket = Ticket(self, tenant, uuid.uuid4().hex)
        await self.quota.acquire(tenant, ticket.lease)
        return request, ticket

    def _fit(self, request: GenerateRequest) -> GenerateRequest:
        options = request.options
        context = options.num_ctx or self.settings.context_tokens
        tokens = estimate_tokens(request)
        if context > 0 and tokens > context:
            raise LlmbusError(
                ErrorCode.PROMPT_TOO_LARGE,
                f"the prompt is about {tokens} tokens, over the model's context of {context}; "
                "shorten or summarise it",
            )
        cap = self.settings.max_output_tokens
        if (
            cap > 0
            and options.num_predict is not None
            and (options.num_predict == -1 or options.num_predict > cap)
        ):
            request = msgspec.structs.replace(
                request, options=msgspec.structs.replace(options, num_predict=cap)
            )
        return request

    def owns(self, accepted: Accepted | None) -> bool:
        """Whether the caller may read or cancel the request `accepted` records."""
        tenant = caller.get()
        if self.keyring is None or tenant.admin:
            return True
        return accepted is not None and accepted.tenant == tenant.name

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
