"""A throw-away PostgreSQL server for the ledger's tests, as `nats_server` is for NATS.

Debian's `postgresql` package provides the binaries; when they are missing and the tests run as
root on a machine with apt (CI), they are installed first. The cluster lives in a temporary
directory, runs as an unprivileged user when the tests run as root (PostgreSQL refuses root), and
is stopped (immediate mode) and removed afterwards. `unavailable()` says why when it cannot run.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services.runtime.nats_server import free_port

USER = "llmbus"


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def ensure_installed() -> Path | None:
    """The directory of `initdb`/`pg_ctl`, installing Debian's `postgresql` when possible."""
    found = _bin_dir()
    if found is not None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        env=env,
        capture_output=True,
        timeout=900,
        check=False,
    )
    return _bin_dir()


class Postgres:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="llmbus-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as an unprivileged user
            owner = "postgres" if _exists("postgres") else "nobody"
            shutil.chown(self.root, owner)
            self.root.chmod(0o700)
            self._as = ["runuser", "-u", owner, "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def init(self) -> Postgres:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        return self.start()

    def start(self) -> Postgres:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.root, ignore_errors=True)


def _exists(user: str) -> bool:
    try:
        import pwd

        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def unavailable() -> str | None:
    if ensure_installed() is None:
        return (
            "PostgreSQL is not installed and could not be (needs root and apt-get): "
            "apt-get install postgresql"
        )
    return None
