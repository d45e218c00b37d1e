"""A 3-node NATS cluster with JetStream on loopback, for fault tests (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from services.runtime import nats_auth
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
        self.size = size
        base.mkdir(parents=True, exist_ok=True)
        self.credentials_file = base / "credentials.json"
        nats_auth.credentials(base)  # once, before the nodes start side by side
        self._configure()

    def _configure(self) -> None:
        base, size = self.base, self.size
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
            # Permissions on, one set of users for the cluster (services/runtime/nats_auth.py).
            self.nodes.append(
                NatsServer(
                    store, port, config_file=config, auth=True, anonymous="admin", credentials_dir=base
                )
            )

    @property
    def url(self) -> str:
        """Every node, comma-separated, as `LLMBUS_NATS_URL` takes them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.config_file is not None and n.config_file.stem == name)

    async def astart(self) -> NatsCluster:
        """Starts every node; again on fresh ports if one could not bind the port it was given
        (`free_port` only reserves it until it returns: a route connection may take it meanwhile)."""
        for _ in range(3):
            # Every start finishes (one that saw its node exit raises: checked below).
            await asyncio.gather(*(node.astart() for node in self.nodes), return_exceptions=True)
            await asyncio.sleep(0.3)  # a node that cannot bind exits at once
            if all(node.proc is not None and node.proc.poll() is None for node in self.nodes):
                return self
            await self.astop()
            self._configure()
        raise RuntimeError(f"the NATS cluster in {self.base} did not start; see its nats-server.log files")

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
