"""Edge admission: who is calling, and whether their request may queue. One place for every API.

* Who is calling is the authentication middleware's answer (services/edge/auth.py): the tenant
  is `request.user`, and every method here that depends on it takes it as an argument.
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

import msgspec
from nats.js import JetStreamContext

from contracts import Accepted, EmbedRequest, ErrorCode, GenerateRequest, LlmbusError
from services.edge.backlog import Backlog, Slot
from services.edge.quota import Quota, open_bucket
from services.edge.tenants import Keyring, Tenant, TenantsFile
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings
from services.runtime.spend import SpendView

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the usual estimate for English text with BPE tokenizers


def request_id_for_key(key: str, tenant: Tenant) -> str:
    """The request id an `Idempotency-Key` becomes: the key itself with auth off, else the key
    prefixed with a tag of the tenant, so two tenants using the same key never meet."""
    if not tenant.name:
        return key
    tag = hashlib.blake2b(tenant.name.encode(), digest_size=4).hexdigest()
    if len(key) <= 119:
        return f"{tag}-{key}"
    return f"{tag}-" + hashlib.blake2b(key.encode(), digest_size=24).hexdigest()


class Ticket:
    """One admitted request's hold on its tenant's limits, given back once when its feed closes."""

    __slots__ = ("admission", "lease", "limited", "released", "reserved", "tenant")

    def __init__(self, admission: Admission, tenant: Tenant, lease: str, *, limited: bool = True) -> None:
        self.admission = admission
        self.tenant = tenant
        self.lease = lease
        self.limited = limited  # holds a request of the tenant's rate limits
        self.reserved = False  # holds tokens against the tenant's budget
        self.released = False

    def give_back(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            self.admission.release_later(self, tokens)


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
        self.spend: SpendView | None = None  # the ledger's totals, once a tenant has a budget
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
        if keyring is not None and any(t.budget.any for t in keyring.tenants.values()):
            await self._open_spend()
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
        if self.spend is not None:
            await self.spend.stop()

    async def admit(
        self, request: GenerateRequest | EmbedRequest, subject: str, tenant: Tenant
    ) -> tuple[GenerateRequest | EmbedRequest, Ticket | None, Slot]:
        """The request as it may be published (`num_predict` capped), its ticket and its place in
        the backlog (`slot.stored()` once published, else `slot.dropped()`); or raises."""
        self.check_model(request.model, tenant)
        await self.check_budget(tenant)  # spent already: refused without a round trip
        if isinstance(request, GenerateRequest):
            request = self._fit(request)
        slot = await self.backlog.admit(subject)  # `llm.req.route` if routed: the classifier's queue
        try:
            ticket = await self.hold(tenant)
            if tenant.budget.any:
                ticket = await self._reserve(ticket, tenant, reserve_tokens(request))
            return request, ticket, slot
        except BaseException:
            slot.dropped()
            raise

    @staticmethod
    def check_model(model: str, tenant: Tenant) -> None:
        """403 `forbidden` for a model outside the tenant's `models` globs."""
        if not tenant.allows(model):
            raise LlmbusError(ErrorCode.FORBIDDEN, f"this key may not use model {model[:64]!r}")

    async def check_budget(self, tenant: Tenant) -> None:
        """429 `budget_exceeded` when the tenant spent its day's or month's budget."""
        budget = tenant.budget
        if not budget.any:
            return
        spend = self.spend or await self._open_spend()  # a reload gave a tenant its first budget
        spend.check(tenant.name, budget)

    async def _reserve(self, ticket: Ticket | None, tenant: Tenant, tokens: int) -> Ticket:
        """Reserves what the request may use against the tenant's budget, shared by every edge
        (services/edge/quota.py): a burst cannot all pass the check before any of it is counted."""
        spend = self.spend or await self._open_spend()
        quota = self.quota or await self._open_quota()
        ticket = ticket or Ticket(self, tenant, uuid.uuid4().hex, limited=False)

        def check(reserved: int) -> None:
            spend.check(tenant.name, tenant.budget, reserved)

        try:
            await quota.reserve(tenant, ticket.lease, tokens, check)
        except BaseException:
            ticket.give_back(0)
            raise
        ticket.reserved = True
        return ticket

    async def _open_spend(self) -> SpendView:
        async with self._opening:
            if self.spend is None:
                self.spend = await SpendView().start(self.js)
            return self.spend

    async def hold(self, tenant: Tenant) -> Ticket | None:
        """Takes one request of the tenant's limits (429 `rate_limited`); None when it has none.

        For calls that do not go through `admit` (`/v1/classify`): give it back with
        `ticket.give_back(tokens)` when the call ends.
        """
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

    def owns(self, accepted: Accepted | None, tenant: Tenant) -> bool:
        """Whether `tenant` may read or cancel the request `accepted` records."""
        if self.is_admin(tenant):
            return True
        return accepted is not None and accepted.tenant == tenant.name

    def is_admin(self, tenant: Tenant) -> bool:
        """Whether `tenant` holds an admin key (everyone does with auth off)."""
        return self.tenants is None or tenant.admin

    def release_later(self, ticket: Ticket, tokens: int) -> None:
        if self.quota is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(ticket, tokens))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, ticket: Ticket, tokens: int) -> None:
        assert self.quota is not None
        try:
            if ticket.reserved:
                await self.quota.settle(ticket.tenant, ticket.lease, tokens)
            if ticket.limited:
                await self.quota.release(ticket.tenant, ticket.lease, tokens)
        except Exception as exc:  # the lease and the reservation expire on their own
            log.warning("could not release an in-flight lease or budget reservation: %s", exc)


def reserve_tokens(request: GenerateRequest | EmbedRequest) -> int:
    """What an admitted request may use, for its budget: the prompt's estimate plus its answer's
    cap (`num_predict`, capped at admission; nothing more when no cap applies)."""
    if isinstance(request, EmbedRequest):
        return sum(-(-len(text) // CHARS_PER_TOKEN) for text in request.inputs)
    return estimate_tokens(request) + max(request.options.num_predict or 0, 0)


def estimate_tokens(request: GenerateRequest) -> int:
    """Characters / 4 over everything the model reads (images are not counted)."""
    chars = len(request.prompt or "") + len(request.system or "")
    for message in request.messages or ():
        chars += len(message.content)
    return -(-chars // CHARS_PER_TOKEN)
