"""`GET /v1/queue`: per model, what waits and runs, who serves it, and the last minute's rates.

Read from JetStream by `services/runtime/queue_stats.py`, so every edge answers the same. A
tenant sees the models its key may use; an admin key (or auth off) sees every model and the
consumers of the request stream.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get
from litestar.di import NamedDependency
from nats.aio.client import Client

from contracts.queue import QueueReport
from services.edge.auth import tenant_of
from services.runtime import queue_stats


@get(
    "/v1/queue",
    summary="Per model: waiting, running, generators, oldest wait, accepted and completed a minute",
)
async def queue(request: Request[Any, Any, Any], nc: NamedDependency[Client]) -> QueueReport:
    report = await queue_stats.of(nc).report()
    caller = tenant_of(request)
    if caller.admin:
        return report
    return msgspec.structs.replace(
        report, models=[m for m in report.models if caller.allows(m.model)], consumers=[]
    )
