"""NATS connection and the idempotent provisioning of streams and consumers.

Every service calls `provision` at start-up, so start order never matters and a fresh server is
set up by whichever service comes first. Updating an existing stream with the same config is a
no-op on the server.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
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
from nats.js.errors import BucketNotFoundError, NotFoundError, ServiceUnavailableError
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


async def connect(settings: Settings, name: str, *, role: str | None = None, **options: Any) -> Client:
    """Connects as the NATS user of `role` (default: from `name`, `llmbus-<role>[-...]`)."""

    client: list[Client] = []  # the callbacks run after connect returns

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own close or drain, not a fault
        log.warning("nats disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    user = credentials(settings, role or name.removeprefix("llmbus-").split("-")[0])
    auth: dict[str, Any] = {}
    if user is not None:
        # Each user may read only its own inbox (infra/nats/auth.conf): `_INBOX.<user>.>`.
        auth = {"user": user[0], "password": user[1], "inbox_prefix": f"_INBOX.{user[0]}"}
    tls = tls_context(settings)
    if tls is not None:
        auth["tls"] = tls
    defaults: dict[str, Any] = {
        "max_reconnect_attempts": -1,  # a service outlives NATS restarts
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "error_cb": on_error,
    }
    nc = await nats.connect(servers(settings.nats_url), name=name, **(defaults | auth | options))
    client.append(nc)
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


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Creates or updates every stream; retried for a while when JetStream is not ready yet
    (a cluster electing its leaders, or several services creating replicated streams at once)."""
    for config in stream_configs(settings):
        await with_backoff(
            functools.partial(_ensure_stream, js, config),
            backoff=Backoff(retries=8, base_s=0.25, max_s=4.0),
            retryable=lambda exc: isinstance(exc, NatsTimeoutError | ServiceUnavailableError),
        )


async def key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """A KV bucket, created on first use by whichever service comes first (same config: idempotent)."""
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(config)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)


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
            max_deliver=settings.max_deliver,
            max_ack_pending=-1,
            max_waiting=4096,
        ),
    )
