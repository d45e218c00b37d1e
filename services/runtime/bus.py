"""NATS connection and the idempotent provisioning of streams and consumers.

Every service calls `provision` at start-up and again after every reconnect (`Reconnects`), so
start order never matters, a fresh server is set up by whichever service comes first, and a
restarted server gets back what it lost (`LLM_OUT` and the memory KV buckets live in memory).
A service only *creates* what is missing: its NATS user may not update, purge or delete a stream
(services/runtime/nats_roles.py). Changing an existing stream's config is the operator's
`llmbus provision` (the admin user), which `llmbus up` runs before it starts the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import sys
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from services.runtime.retry import Backoff, with_backoff
from services.runtime.settings import Settings

log = logging.getLogger(__name__)


def credentials(settings: Settings, role: str) -> tuple[str, str] | None:
    """The NATS user and password this process connects with (see `Settings.nats_user`)."""
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    path = Path(settings.nats_credentials or Path(settings.data_dir) / "nats" / "credentials.json")
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (role, str(known[role])) if role in known else None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    if settings.nats_tls_cert:
        context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
    return context


class NatsUnreachable(Exception):
    """NATS did not take the connection; the message is the one line an operator needs."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {url}: {reason}")


def display_url(url: str) -> str:
    """`LLMBUS_NATS_URL` as it is safe to print: any password in it masked."""
    parts = []
    for server in servers(url):
        parsed = urlsplit(server if "://" in server else f"nats://{server}")
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        if parsed.username:
            netloc = f"{parsed.username}:***@{netloc}" if parsed.password else f"{parsed.username}@{netloc}"
        parts.append(f"{parsed.scheme}://{netloc}")
    return ",".join(parts)


def _is_authorization(failure: BaseException | None) -> bool:
    return isinstance(failure, AuthorizationError) or "authorization violation" in str(failure).lower()


def _reason(failure: BaseException | None, timeout: float) -> str:
    """What went wrong, in the words an operator searches for."""
    if _is_authorization(failure):
        return (
            "authorization violation (wrong NATS user or password: see LLMBUS_NATS_USER, "
            "LLMBUS_NATS_PASSWORD and LLMBUS_NATS_CREDENTIALS)"
        )
    if isinstance(failure, ConnectionRefusedError):
        return "connection refused (is nats-server running there? `llmbus up` starts one)"
    if isinstance(failure, ssl.SSLError):
        return f"TLS failed: {failure.reason or failure}"
    if isinstance(failure, socket.gaierror):
        return f"unknown host ({failure.strerror})"
    if failure is None or isinstance(failure, (TimeoutError, NatsTimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror.lower()
    return str(failure).removeprefix("nats: ") or type(failure).__name__


async def connect(
    settings: Settings, name: str, *, role: str | None = None, within: float = 5.0, **options: Any
) -> Client:
    """Connects as the NATS user of `role` (default: from `name`, `llmbus-<role>[-...]`).

    One attempt at every server of `LLMBUS_NATS_URL`, `within` seconds: `NatsUnreachable` with the
    reason when none takes the connection, so a command never hangs. Once connected, the client
    reconnects without limit: a service outlives NATS restarts. (nats.py's own initial-connect
    retry cannot be bounded: it reads `max_reconnect_attempts=0` as "forever".)
    """

    client = Client()
    connected = False
    failures: list[BaseException] = []  # until connected, errors are kept for the one-line report

    async def on_disconnect() -> None:
        if client.is_closed or client.is_draining or failures:
            return  # our own close or drain, or a failed first attempt: not a fault to log
        log.warning("nats disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("nats reconnected")
        await reconnects(client).fire()

    async def on_error(exc: Exception) -> None:
        if not connected:
            failures.append(exc)
            return
        log.warning("nats error: %s", exc)

    role = role or name.removeprefix("llmbus-").split("-")[0]
    user = credentials(settings, role)
    # Each user may read only its own inbox (infra/nats/auth.conf): `_INBOX.<user>.>`; without
    # credentials too, so a server's `no_auth_user` (the tests' admin) sees the same subjects.
    auth: dict[str, Any] = {"inbox_prefix": f"_INBOX.{user[0] if user else role}"}
    if user is not None:
        auth |= {"user": user[0], "password": user[1]}
    tls = tls_context(settings)
    if tls is not None:
        auth["tls"] = tls
    first_attempt: dict[str, Any] = {
        "allow_reconnect": False,
        "max_reconnect_attempts": 2,  # each server three times at most, then NoServersError
        "reconnect_time_wait": 0.1,
        "connect_timeout": within,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "error_cb": on_error,
    }
    try:
        await asyncio.wait_for(
            client.connect(servers(settings.nats_url), name=name, **(first_attempt | auth | options)), within
        )
    except (TimeoutError, OSError, NatsError) as exc:
        with contextlib.suppress(Exception):
            await client.close()
        # The server's word beats the socket's: a refused password often shows up as a reset too.
        cause: BaseException | None = next(
            (failure for failure in failures if _is_authorization(failure)), failures[-1] if failures else exc
        )
        if isinstance(cause, (NoServersError, TimeoutError)):
            cause = None  # they say nothing more than "no answer"
        raise NatsUnreachable(display_url(settings.nats_url), _reason(cause, within)) from None
    connected = True
    failures.clear()
    # Connected: from now on reconnect forever, every half second (the options are read live).
    client.options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    client.options.update({k: v for k, v in options.items() if k in _RECONNECT_OPTIONS})
    return client


_RECONNECT_OPTIONS = ("allow_reconnect", "max_reconnect_attempts", "reconnect_time_wait")
SERVICE_CONNECT_BACKOFF = Backoff(retries=sys.maxsize, base_s=0.5, max_s=10.0)


async def connect_with_retry(settings: Settings, name: str, *, role: str | None = None) -> Client:
    """A service's connect: says where it connects, retries with capped backoff while NATS is
    unreachable (each failure logged with its reason), and can be cancelled at any point, so
    SIGTERM stops a service that is still waiting for NATS."""
    log.info("connecting to NATS at %s", display_url(settings.nats_url))

    def report(failure: Exception, delay: float) -> None:
        log.warning("%s; retrying in %.1f s", failure, delay)

    nc = await with_backoff(
        lambda: connect(settings, name, role=role),
        backoff=SERVICE_CONNECT_BACKOFF,
        retryable=lambda failure: isinstance(failure, NatsUnreachable),
        on_retry=report,
    )
    log.info("connected to NATS at %s", display_url(settings.nats_url))
    return nc


# Room left in a message for its headers (message id, reply, deadline, trace context).
HEADER_ROOM = 1024


def check_payload(nc: Client, size: int) -> None:
    """Raises `request_too_large` when a message of `size` bytes would not fit NATS's `max_payload`
    (the server's limit, learnt at connect): refused with the limit named, never dropped."""
    if size + HEADER_ROOM > nc.max_payload:
        raise LlmbusError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"the request is {size} bytes on the bus; NATS accepts at most {nc.max_payload - HEADER_ROOM} "
            f"(max_payload {nc.max_payload}): send a shorter prompt or fewer inputs per request",
        )


def servers(url: str) -> list[str]:
    """`LLMBUS_NATS_URL` may list a cluster's nodes, comma-separated; the client fails over among them."""
    return [part.strip() for part in url.split(",") if part.strip()]


def stream_configs(settings: Settings) -> list[StreamConfig]:
    return [
        # Requests: work-queue retention, so each is removed once a worker acks it.
        StreamConfig(
            name=subjects.REQUEST_STREAM,
            subjects=[subjects.REQUEST_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=settings.dedupe_window_s,
            max_msg_size=settings.max_body_bytes * 2,
            discard=DiscardPolicy.NEW,
            num_replicas=settings.stream_replicas,
        ),
        # Events: every event of every request, briefly, for resume and for continuing after a crash.
        StreamConfig(
            name=subjects.EVENT_STREAM,
            subjects=[subjects.EVENT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY,
            max_age=settings.event_max_age_s,
            max_bytes=256 * 1024 * 1024,
            discard=DiscardPolicy.OLD,
            num_replicas=settings.stream_replicas,
            allow_direct=True,  # services/runtime/events.py reads a request's events by direct get
        ),
        # Dead letters: requests a worker gave up on, with the reason (`llmbus dlq list|replay`).
        StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[subjects.DEAD_LETTER_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.dlq_max_age_s,
            max_msg_size=settings.max_body_bytes * 2 + 4096,
            discard=DiscardPolicy.OLD,
            num_replicas=settings.stream_replicas,
        ),
    ]


Listener = Callable[[], Awaitable[None]]


class Reconnects:
    """The one "NATS is back" signal of a connection: what was subscribed runs after every
    reconnect, each listener in a task of its own (nats.py awaits its `reconnected_cb` inside
    its reconnect loop, which must not wait for our re-provisioning)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Runs `listener` after each reconnect; returns the way to unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def fire(self) -> None:
        for listener in list(self._listeners):
            task = asyncio.create_task(self._run(listener))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(listener: Listener) -> None:
        try:
            await listener()
        except Exception:
            log.exception("after a NATS reconnect: %s failed", getattr(listener, "__qualname__", listener))


_reconnects: weakref.WeakKeyDictionary[Client, Reconnects] = weakref.WeakKeyDictionary()


def reconnects(nc: Client) -> Reconnects:
    """The reconnect signal of `nc` (fired by `connect`'s `reconnected_cb`)."""
    signal = _reconnects.get(nc)
    if signal is None:
        signal = _reconnects[nc] = Reconnects()
    return signal


# JetStream's "stream name already in use with a different configuration".
_STREAM_CONFIG_DIFFERS = 10058
_JETSTREAM_BUSY = Backoff(retries=8, base_s=0.25, max_s=4.0)


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, NatsTimeoutError | ServiceUnavailableError)


async def provision(js: JetStreamContext, settings: Settings, *, update: bool = False) -> None:
    """Creates every stream that is missing (what a service does at start and after a reconnect);
    with `update`, also brings existing ones to the current config (`llmbus provision`, as admin).

    Retried for a while when JetStream is not ready yet (a cluster electing its leaders, or
    several services creating replicated streams at once).
    """
    for config in stream_configs(settings):
        await ensure_stream(js, config, update=update)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool = False) -> None:
    """Creates the stream (a no-op when it exists with this config); with `update`, changes an
    existing one to it. A service whose settings differ from the stream's (it may not update it)
    logs that `llmbus provision` applies them, and uses the stream as it is."""
    assert config.name is not None

    async def once() -> None:
        if update:
            try:
                await js.stream_info(config.name or "")
                await js.update_stream(config)
                return
            except NotFoundError:
                pass
        try:
            await js.add_stream(config)
        except APIError as exc:
            if exc.err_code != _STREAM_CONFIG_DIFFERS:
                raise
            log.warning(
                "stream %s exists with another configuration than this service's settings; "
                "`llmbus provision` applies them (it keeps working with the stream as it is)",
                config.name,
            )

    await with_backoff(once, backoff=_JETSTREAM_BUSY, retryable=_busy)


async def key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """A KV bucket, created on first use by whichever service comes first (same config: idempotent)."""
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(config)


def filters(filter_subject: str | list[str]) -> list[str]:
    return [filter_subject] if isinstance(filter_subject, str) else filter_subject


async def ensure_consumer(
    js: JetStreamContext, settings: Settings, durable: str, filter_subject: str | list[str]
) -> None:
    """A durable pull consumer shared by every replica of one worker kind.

    Several subjects (one per model a host serves) use `filter_subjects`; consumers of the
    work-queue request stream must not overlap, so each set of subjects gets its own durable.
    """
    several = filters(filter_subject)
    await js.add_consumer(
        subjects.REQUEST_STREAM,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=several[0] if len(several) == 1 else None,
            filter_subjects=several if len(several) > 1 else None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait_s,
            # Unlimited: the worker counts deliveries itself and dead-letters a request on the one
            # after the last allowed (`Worker._exhausted`), with the message in hand, so no worker
            # needs to read or delete messages of the stream by sequence.
            max_deliver=-1,
            max_ack_pending=-1,
            max_waiting=4096,
        ),
    )
