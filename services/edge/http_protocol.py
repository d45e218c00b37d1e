"""The edge's HTTP/1.1 connection: uvicorn's httptools protocol with read timeouts and JSON errors.

uvicorn bounds only the idle time between two requests on a connection (keep-alive). A client
that opens a connection and sends nothing, sends headers that never end, or sends fewer body bytes
than its `Content-Length` would hold the connection (and a request's task) for good. Here a
request's headers must be complete within `LLMBUS_HTTP_HEADER_TIMEOUT_S` of its first byte (of the
connection, for the first request) and its body within `LLMBUS_HTTP_BODY_TIMEOUT_S` of its
headers, else the edge answers `408` (when no response has started) and closes the connection.
Requests that httptools cannot parse get the edge's JSON error shape with code `bad_request`
instead of uvicorn's plain-text 400.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from contracts import ErrorBody, ErrorCode, ErrorDetail

_REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP response in the edge's error shape, which closes the connection."""
    request_id = uuid.uuid4().hex
    body = msgspec.json.encode(
        ErrorBody(ErrorDetail(code=ErrorCode.BAD_REQUEST, message=message, request_id=request_id))
    )
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-request-id: %s\r\nconnection: close\r\n\r\n"
    ) % (status, _REASONS[status], len(body), request_id.encode())
    return head + body


class EdgeHttpProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "headers")  # a connection that sends nothing, too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(400, f"malformed HTTP request: {msg}"))
        self.transport.close()

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._too_slow, seconds, part)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self, seconds: float, part: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            message = f"the request's {part} did not arrive within {seconds:g} s"
            self.transport.write(error_bytes(408, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the handler reading the body gets `http.disconnect`; its
            cycle.message_event.set()  # answer goes nowhere (the 408 was the answer)
        self.transport.close()


def edge_protocol(header_timeout_s: float, body_timeout_s: float) -> type[EdgeHttpProtocol]:
    """The protocol class uvicorn is given (`http=`), with these timeouts."""
    return type(
        "EdgeHttp",
        (EdgeHttpProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
