"""Child processes of the benchmark: start, wait until ready, measure, stop.

Every process the benchmark starts is one `Proc`; the figures of a contender are summed over its
processes and their children (LiteLLM and granian fork workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Usage:
    cpu_s: float  # user + system seconds
    rss_mb: float  # resident memory now
    peak_rss_mb: float  # high-water mark of resident memory since the last reset


class Proc:
    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops children in order
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            code = None if self.popen is None else self.popen.returncode
            raise RuntimeError(f"{self.name} exited ({code}); last lines of {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout}s:\n{self.tail()}")

    def processes(self) -> list[psutil.Process]:
        """This process and every descendant (workers forked by a server)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, self.stop_signal)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class Group:
    """The processes that make up one contender's gateway (empty for the direct contender)."""

    def __init__(self, procs: Iterable[Proc], extra_pids: Iterable[int] = ()) -> None:
        self.procs = list(procs)
        self.extra_pids = list(extra_pids)

    def processes(self) -> list[psutil.Process]:
        found = [p for proc in self.procs for p in proc.processes()]
        for pid in self.extra_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
        return found

    def reset_peak(self) -> None:
        # Linux: writing 5 to clear_refs resets VmHWM, so each load level has its own peak.
        for p in self.processes():
            with contextlib.suppress(OSError):
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")

    def usage(self) -> Usage:
        cpu = rss = peak = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                times = p.cpu_times()
                cpu += times.user + times.system
                status = _status(p.pid)
                rss += status.get("VmRSS", 0) / 1024
                peak += status.get("VmHWM", status.get("VmRSS", 0)) / 1024
        return Usage(cpu_s=cpu, rss_mb=rss, peak_rss_mb=peak)


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])  # kB
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PYTHON = sys.executable
