"""`llmbus edge`: serve the Litestar app with uvicorn."""

from __future__ import annotations

import uvicorn

from services.edge.app import create_app
from services.edge.http_protocol import edge_protocol
from services.runtime import tracing
from services.runtime.service import freeze_startup_heap, setup_logging
from services.runtime.settings import Settings


def main(settings: Settings) -> None:
    setup_logging(settings.log_level, "llmbus-edge")
    tracing.setup("llmbus-edge")
    app = create_app(settings)
    app.on_startup.append(freeze_startup_heap)  # after the lifespan has connected
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        http=edge_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),  # 408s, JSON 400
        log_level="warning",
        log_config=None,  # uvicorn's own lines go through the JSON formatter too
        access_log=False,  # the edge logs one structured line per request itself
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    tracing.shutdown()
