"""`llmbus edge`: serve the Litestar app with uvicorn."""

from __future__ import annotations

import socket

import uvicorn

from services.edge.app import create_app
from services.edge.dialects import DialectConflict
from services.edge.http_protocol import edge_protocol
from services.runtime import metrics, tracing
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
    server.run(sockets=listeners(settings))
    tracing.shutdown()
    if getattr(app.state, "failed", False):
        raise SystemExit(1)


def listeners(settings: Settings) -> list[socket.socket] | None:
    """The sockets of one of several edge processes (`LLMBUS_EDGE_WORKERS`), None for a lone edge
    (uvicorn binds, and a taken port is an error): the HTTP port, shared with the others through
    SO_REUSEPORT (the kernel spreads new connections over them), and, with metrics on, a port of
    its own, where Prometheus reaches this process's /metrics and not a random one's."""
    if settings.edge_workers <= 1:
        return None
    shared = _bind(settings.http_host, settings.http_port, reuse_port=True)
    own = metrics.port_for("edge", settings.metrics_port, settings.replica)
    return [shared, _bind(settings.http_host, own)] if own else [shared]


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
