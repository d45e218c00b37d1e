"""`llmbus edge`: serve the Litestar app with uvicorn."""

from __future__ import annotations

import uvicorn

from services.edge.app import create_app
from services.edge.dialects import DialectConflict
from services.edge.http_protocol import edge_protocol
from services.runtime import tracing
from services.runtime.service import freeze_startup_heap, setup_process
from services.runtime.settings import Settings


def main(settings: Settings) -> None:
    setup_process("edge", settings)
    server: uvicorn.Server | None = None

    def fatal() -> None:
        assert server is not None
        server.should_exit = True

    try:
        app = create_app(settings, on_ready=freeze_startup_heap, on_fatal=fatal)
    except DialectConflict as exc:  # one line naming both dialects, no traceback
        raise SystemExit(str(exc)) from None
    config = uvicorn.Config(
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
    server = uvicorn.Server(config)
    server.run()
    tracing.shutdown()
    if getattr(app.state, "failed", False):
        raise SystemExit(1)
