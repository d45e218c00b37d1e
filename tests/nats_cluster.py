"""A 3-node NATS cluster with JetStream on loopback, for fault tests (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from services.runtime.nats_server import NatsServer, free_port

# `sync_interval: always`: fsync before acknowledging, so a node killed with SIGKILL loses nothing it
# acknowledged (docs/reliability.md: the Jepsen report on NATS 2.12.1). The store directory comes
# from `NatsServer` (`-sd`).
NODE_CONFIG = """\
server_name: {name}
jetstream {{
  sync_interval: always
}}
cluster {{
  name: llmbus
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""


class NatsCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        ports = [free_port() for _ in range(size)]
        cluster_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
        self.nodes: list[NatsServer] = []
        for i, (port, cluster_port) in enumerate(zip(ports, cluster_ports, strict=True)):
            name = f"n{i + 1}"
            store = base / name
            store.mkdir(parents=True, exist_ok=True)
            config = base / f"{name}.conf"
            config.write_text(NODE_CONFIG.format(name=name, cluster_port=cluster_port, routes=routes))
            self.nodes.append(NatsServer(store, port, config_file=config))

    @property
    def url(self) -> str:
        """Every node, comma-separated, as `LLMBUS_NATS_URL` takes them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.config_file is not None and n.config_file.stem == name)

    async def astart(self) -> NatsCluster:
        await asyncio.gather(*(node.astart() for node in self.nodes))
        return self

    async def astop(self) -> None:
        await asyncio.gather(*(node.astop() for node in self.nodes))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the cluster has a JetStream meta leader and can create an R3 stream."""
        nc = await nats.connect(self.url.split(","))
        try:
            js = nc.jetstream(timeout=2)
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await js.add_stream(
                            StreamConfig(
                                name="READY", subjects=["ready.>"], num_replicas=3, storage=StorageType.MEMORY
                            )
                        )
                        await js.delete_stream("READY")
                        return
                    except Exception:
                        await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
