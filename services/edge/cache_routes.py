"""`GET /v1/cache` (statistics) and `DELETE /v1/cache` (purge): the response cache's operator side.

A tenant sees and purges its own answers; an admin key (or auth off) sees the whole bucket and
purges every tenant's, or one tenant's with `?tenant=`.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, delete, get
from litestar.di import NamedDependency
from litestar.params import FromQuery

from contracts import ErrorCode, LlmbusError
from services.edge.response_cache import ResponseCache
from services.edge.tenants import Tenant

Cache = NamedDependency[ResponseCache | None]


def _scope(request: Request[Any, Any, Any], tenant: str | None) -> str | None:
    """The tenant the call is limited to (None: every tenant's, for an admin)."""
    caller: Tenant = request.user
    return tenant if caller.admin else caller.name


def _need(cache: ResponseCache | None) -> ResponseCache:
    if cache is None:
        raise LlmbusError(ErrorCode.BUS_UNAVAILABLE, "the response cache is not open yet", retry_after=1)
    return cache


@get("/v1/cache", summary="Response cache statistics")
async def cache_stats(
    request: Request[Any, Any, Any], response_cache: Cache, tenant: FromQuery[str | None] = None
) -> dict[str, Any]:
    return await _need(response_cache).stats(_scope(request, tenant))


@delete("/v1/cache", summary="Purge the response cache", status_code=200)
async def cache_purge(
    request: Request[Any, Any, Any], response_cache: Cache, tenant: FromQuery[str | None] = None
) -> dict[str, Any]:
    scope = _scope(request, tenant)
    purged = await _need(response_cache).store.purge(scope)
    return {"purged": purged, "tenant": scope}


ROUTES = [cache_stats, cache_purge]
