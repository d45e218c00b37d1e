"""The client side of the janitor's admin API, shared by the edge and the CLI.

It picks the janitor to ask: the named host; else the one host that has the model; else any
janitor when there is only one host. With several hosts and no way to choose it refuses
(`bad_request`) rather than guess.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import ModelEvent, OpAccepted, OpDone, OpError, validate_host
from services.runtime.inventory import InventoryView
from services.runtime.micro import read_reply

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(ModelEvent).decode

# How long an admin call may take: `load` reads a whole model from disk.
CALL_TIMEOUT_S = {"load": 600.0, "delete": 60.0, "copy": 60.0}
DEFAULT_TIMEOUT_S = 15.0
# A pull reports progress many times a second; this long without any event means it is stuck.
SILENCE_TIMEOUT_S = 300.0


class AdminClient:
    def __init__(self, nc: Client, inventory: InventoryView | None = None) -> None:
        self.nc = nc
        self.inventory = inventory

    def host_for(self, host: str | None, model: str | None = None, *, where_it_is: bool = True) -> str | None:
        """The host to ask (None: any janitor). `where_it_is`: the model must already be there."""
        known = self.inventory.hosts() if self.inventory is not None else set()
        if host:
            validate_host(host)
            if self.inventory is not None and self.inventory.populated and host not in known:
                # A host no janitor ever listed is the caller's mistake (404), not an outage (503).
                raise LlmbusError(ErrorCode.NOT_FOUND, f"no host {host!r}; GET /v1/models lists the hosts")
            return host
        if model and where_it_is and self.inventory is not None:
            having = sorted({info.host for info in self.inventory.lookup(model)})
            if len(having) == 1:
                return having[0]
            if len(having) > 1:
                raise LlmbusError(
                    ErrorCode.BAD_REQUEST,
                    f"model {model!r} is on several hosts ({', '.join(having)}): name one with `host`",
                )
        if len(known) > 1:
            raise LlmbusError(
                ErrorCode.BAD_REQUEST,
                f"there are several hosts ({', '.join(sorted(known))}): name one with `host`",
            )
        return None

    async def call(self, verb: str, body: Any, reply: type[T], host: str | None = None) -> T:
        subject = subjects.admin_subject(verb, host)
        payload = b"" if body is None else _encode(body)
        try:
            msg = await self.nc.request(subject, payload, timeout=CALL_TIMEOUT_S.get(verb, DEFAULT_TIMEOUT_S))
        except NoRespondersError:
            where = f"for host {host!r} " if host else ""
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"no janitor {where}is running (start one: `llmbus janitor`)"
            ) from None
        except (NatsTimeoutError, TimeoutError):
            raise LlmbusError(
                ErrorCode.DEADLINE_EXCEEDED, f"the janitor did not answer {verb} in time"
            ) from None
        return read_reply(msg, reply)

    async def operate(self, verb: str, body: dict[str, Any], host: str | None) -> AsyncIterator[ModelEvent]:
        """Starts a pull or create; returns its events, the last of which is `done` or `error`.

        Raises `LlmbusError` here, before any event, when the janitor refuses to start it.
        """
        progress = self.nc.new_inbox()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def put(msg: Any) -> None:
            queue.put_nowait(msg.data)

        sub = await self.nc.subscribe(progress, cb=put)  # before the request: no event is missed
        try:
            await self.call(verb, {**body, "progress": progress}, OpAccepted, host)
        except BaseException:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        return self._follow(verb, sub, queue)

    @staticmethod
    async def _follow(verb: str, sub: Subscription, queue: asyncio.Queue[bytes]) -> AsyncIterator[ModelEvent]:
        try:
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), SILENCE_TIMEOUT_S)
                except TimeoutError:
                    raise LlmbusError(
                        ErrorCode.DEADLINE_EXCEEDED, f"no progress from the janitor's {verb} for a long time"
                    ) from None
                event = _decode_event(data)
                yield event
                if isinstance(event, OpDone | OpError):
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
