"""Who is calling: an authentication middleware that makes the tenant `request.user`.

It maps `Authorization: Bearer <key>` to a tenant of the tenants file (401 `unauthorized`
otherwise); with auth off, or before the edge is attached to NATS, every caller is the anonymous
tenant (unlimited and admin). Probes, metrics, the API schema and the demo page are public. The
`admin_only` guard refuses routes marked `opt={"admin": True}` to a non-admin tenant (403).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp

from contracts import ErrorCode, LlmbusError
from contracts.usage import Origin
from services.edge.tenants import ANONYMOUS, Keyring, Tenant, hash_key

# Routes anyone may call with auth on: probes, metrics, the OpenAPI document, the demo page.
PUBLIC = [
    "^/$", "^/health/live$", "^/health/ready$", "^/metrics$", "^/api/version$", "^/schema", "^/static/",
    "^/contract", "^/api/v1/health$",  # the seed dialects' health, unauthenticated as the seeds' was
]  # fmt: skip
ADMIN = "admin"  # a route handler with `opt={"admin": True}` needs an admin tenant
KEY_ID_CHARS = 12  # hex digits of the key's SHA-256 kept as its id (the ledger's `key_id`)

Keys = Callable[[], Keyring | None]  # the tenants as of now; None with auth off (or not attached yet)


class Authenticate(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        super().__init__(app, exclude=PUBLIC)
        self.keys = keys

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        keyring = self.keys()
        if keyring is None:
            return AuthenticationResult(user=ANONYMOUS, auth=None)
        scheme, _, key = connection.headers.get("authorization", "").partition(" ")
        tenant = keyring.find(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if tenant is None:
            raise LlmbusError(
                ErrorCode.UNAUTHORIZED, "a valid API key is required: `Authorization: Bearer <key>`"
            )
        connection.scope.setdefault("state", {})["tenant"] = tenant.name  # for logs, never the key
        # `request.auth`: the key's id, never the key (the ledger records which key was used).
        return AuthenticationResult(user=tenant, auth=hash_key(key.strip())[7 : 7 + KEY_ID_CHARS])


def tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Tenant:
    """The caller (the anonymous tenant on a public route, which the middleware skips)."""
    user = connection.scope.get("user")
    return user if isinstance(user, Tenant) else ANONYMOUS


async def admin_only(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    if handler.opt.get(ADMIN) and not tenant_of(connection).admin:
        raise LlmbusError(ErrorCode.FORBIDDEN, "this route needs an admin key")


def dialect(path: str) -> str:
    """The API family a path belongs to, as the ledger records it."""
    if path.startswith("/openai/"):
        return "openai"
    if path.startswith("/ollama/"):
        return "ollama"
    if path.startswith("/v1/tasks"):
        return "tasks"
    return "native"


def origin_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Origin:
    """Who asks, for the request's `Llmbus-Origin` header (the dispatcher adds the model and time)."""
    key_id = connection.scope.get("auth")
    return Origin(
        tenant=tenant_of(connection).name,
        key_id=key_id if isinstance(key_id, str) else "",
        api=dialect(connection.scope["path"]),
    )
