"""The edge's per-request subscriptions hand messages over from nats-py's read loop, no task each."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.aio.msg import Msg

from services.runtime import direct_sub
from services.runtime.nats_server import NatsServer


async def test_messages_arrive_in_order_without_a_task_per_subscription(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        got: dict[str, list[bytes]] = {}
        tasks_before = len(asyncio.all_tasks())
        subs = []
        for i in range(50):
            got[f"t.{i}"] = []
            sub, direct = await direct_sub.subscribe(
                nc, f"t.{i}", lambda msg, i=i: got[f"t.{i}"].append(msg.data)
            )
            assert direct  # the nats-py in the lock keeps its messages in `_pending_queue`
            subs.append(sub)
        assert len(asyncio.all_tasks()) == tasks_before  # nats-py would run one task per subscription
        for n in range(20):
            for i in range(50):
                await nc.publish(f"t.{i}", str(n).encode())
        await nc.flush()
        await _until(lambda: all(len(v) == 20 for v in got.values()))
        assert all(v == [str(n).encode() for n in range(20)] for v in got.values())

        await subs[0].unsubscribe()  # nothing more after unsubscribing
        await nc.publish("t.0", b"late")
        await nc.publish("t.1", b"late")
        await nc.flush()
        await _until(lambda: len(got["t.1"]) == 21)
        assert len(got["t.0"]) == 20
    finally:
        await nc.close()


async def test_a_nats_py_without_the_queue_gets_the_callback_subscription(
    nats_server: NatsServer, monkeypatch: Any
) -> None:
    monkeypatch.setattr(direct_sub, "_usable", lambda sub: False)  # as if nats-py changed inside
    nc = await nats.connect(nats_server.url)
    try:
        got: list[bytes] = []

        def deliver(msg: Msg) -> None:
            got.append(msg.data)

        sub, direct = await direct_sub.subscribe(nc, "f.1", deliver)
        assert not direct
        for n in range(5):
            await nc.publish("f.1", str(n).encode())
        await nc.flush()
        await _until(lambda: len(got) == 5)
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        await sub.unsubscribe()
    finally:
        await nc.close()


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
