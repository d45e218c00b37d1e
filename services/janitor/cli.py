"""`llmbus models list|ps|show|pull|create|cp|rm|load|unload`: the admin API from a terminal.

`list` and `ps` read the inventory (every host); the others ask the janitor of the model's host
over NATS (`LLMBUS_NATS_URL`). `pull` and `create` draw a progress bar on a terminal and print one
line per step otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TextIO

from contracts import LlmbusError
from contracts.models import (
    CopyRequest,
    LoadRequest,
    ModelDetails,
    ModelEvent,
    ModelInfo,
    ModelRef,
    OpAccepted,
    OpDone,
    OpError,
    OpProgress,
    Progress,
)
from services.runtime import bus
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

BAR_WIDTH = 28
_DETAILS = ("family", "parameter_size", "quantization_level")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser(
        "models", help="list, pull, create, remove, load and unload models (via the janitor)"
    )
    verbs = models.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str, *args: str) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=text)
        for arg in args:
            parser.add_argument(arg)
        parser.add_argument("--host", help="the Ollama host (default: the one that has it, or the only one)")
        return parser

    verb("list", "every model on every host (the inventory)")
    verb("ps", "the models loaded in memory now")
    verb("show", "a model's Modelfile, parameters and state", "name")
    verb("pull", "pull a model onto a host, with a progress bar", "name")
    verb("create", "create a model from a Modelfile", "name").add_argument(
        "-f", "--file", required=True, type=Path, help="the Modelfile"
    )
    verb("cp", "copy a model under a new name", "source", "destination")
    verb("rm", "delete a model from its host", "name")
    verb("load", "load a model into memory now", "name").add_argument(
        "--keep-alive", type=float, default=None, help="seconds to keep it loaded (-1: until unloaded)"
    )
    verb("unload", "unload a model from memory now", "name")


def main(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(run(args, settings, sys.stdout))


async def run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    # The operator's NATS user (`admin`), from LLMBUS_NATS_USER or the data directory's credentials;
    # NATS unreachable: `bus.NatsUnreachable`, which `llmbus` reports in one line.
    nc = await bus.connect(settings, "llmbus-admin")
    inventory = await InventoryView().start(nc.jetstream())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inventory.synced.wait(), 3)
        return await _verb(args, AdminClient(nc, inventory), inventory, out)
    except LlmbusError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await inventory.stop()
        await nc.drain()


async def _verb(args: argparse.Namespace, admin: AdminClient, inventory: InventoryView, out: TextIO) -> int:
    host: str | None = args.host
    if args.verb in ("list", "ps"):
        infos = [i for i in inventory.entries.values() if (not host or i.host == host)]
        if args.verb == "ps":
            infos = [i for i in infos if i.loaded]
        if not infos and not inventory.entries:
            print("no models in the inventory (is a janitor running? `llmbus janitor`)", file=sys.stderr)
        _table(sorted(infos, key=lambda i: (i.model, i.host)), out, loaded=args.verb == "ps")
        return 0
    if args.verb == "show":
        details = await admin.call("show", ModelRef(args.name), ModelDetails, admin.host_for(host, args.name))
        _show(details, out)
        return 0
    if args.verb in ("pull", "create"):
        body = {"model": args.name}
        if args.verb == "create":
            body["modelfile"] = args.file.read_text()
        target = admin.host_for(host, args.name, where_it_is=False)
        events = await admin.operate(args.verb, body, target)
        return await _follow(events, out)
    if args.verb == "cp":
        copy = CopyRequest(source=args.source, destination=args.destination)
        info = await admin.call("copy", copy, ModelInfo, admin.host_for(host, args.source))
        print(f"copied {args.source} to {info.model} on {info.host}", file=out)
    elif args.verb == "rm":
        done = await admin.call("delete", ModelRef(args.name), OpAccepted, admin.host_for(host, args.name))
        print(f"deleted {done.model} from {done.host}", file=out)
    elif args.verb == "load":
        load = LoadRequest(model=args.name, keep_alive_s=args.keep_alive)
        info = await admin.call("load", load, ModelInfo, admin.host_for(host, args.name))
        print(f"loaded {info.model} on {info.host}", file=out)
    elif args.verb == "unload":
        info = await admin.call("unload", ModelRef(args.name), ModelInfo, admin.host_for(host, args.name))
        print(f"unloaded {info.model} on {info.host}", file=out)
    return 0


async def _follow(events: AsyncIterator[ModelEvent], out: TextIO) -> int:
    tty = out.isatty()
    shown = ""
    async for event in events:
        if isinstance(event, OpProgress):
            line = progress_line(event.progress)
            if tty:
                print("\r" + line.ljust(100)[:100], end="", file=out, flush=True)
            elif _step(event.progress) != shown:  # one line per status and per 10%
                shown = _step(event.progress)
                print(line, file=out, flush=True)
        elif isinstance(event, OpDone):
            if tty:
                print(file=out)
            print(f"{event.op} {event.model} on {event.host}: done", file=out)
            return 0
        elif isinstance(event, OpError):
            if tty:
                print(file=out)
            print(f"error: {event.code.value}: {event.message}", file=sys.stderr)
            return 1
    return 1


def _step(progress: Progress) -> str:
    percent = progress.percent
    return progress.status if percent is None else f"{progress.status} {int(percent // 10)}"


def progress_line(progress: Progress) -> str:
    """`pulling 5f2a9c1e3b7d  42% ▕███████████▏  512 MB/1.2 GB`, or the status alone."""
    percent = progress.percent
    if percent is None:
        return progress.status
    filled = int(BAR_WIDTH * progress.completed / progress.total)
    bar = "█" * filled + " " * (BAR_WIDTH - filled)
    amount = f"{human_size(progress.completed)}/{human_size(progress.total)}"
    return f"{progress.status:<28} {percent:5.1f}% ▕{bar}▏ {amount}"


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_duration(seconds: float) -> str:
    """`300` -> `5m`, `5400` -> `1h30m`, `0.3` -> `0.3s`."""
    if seconds < 60:
        return f"{seconds:g}s"
    out, rest = "", int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, now - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _table(infos: list[ModelInfo], out: TextIO, *, loaded: bool) -> None:
    now = time.time()
    columns: list[tuple[str, Callable[[ModelInfo], str]]] = [
        ("MODEL", lambda i: i.model),
        ("HOST", lambda i: i.host),
        ("STATE", _state),
        ("SIZE", lambda i: human_size(i.size) if i.size else "-"),
    ]
    if loaded:
        columns.append(("VRAM", lambda i: human_size(i.size_vram)))
        columns.append(("UNTIL", lambda i: "forever" if i.pinned else _until(i.expires_at, now)))
    columns.append(("LAST USED", lambda i: _ago(i.last_used, now)))
    columns.append(("POLICY", _policy))
    rows = [[name for name, _ in columns]] + [[cell(i) for _, cell in columns] for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(len(columns))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _state(info: ModelInfo) -> str:
    if info.progress is not None and info.progress.percent is not None:
        return f"{info.state} {info.progress.percent:g}%"
    return info.state


def _until(expires: float | None, now: float) -> str:
    if expires is None:
        return "-"
    left = expires - now
    return "forever" if left > 10 * 365 * 86400 else f"{max(0.0, left):.0f}s"


def _policy(info: ModelInfo) -> str:
    parts = ["pinned" if info.pinned else ""]
    if info.warm and not info.pinned:
        parts.append("warm")
    if not info.pinned and info.idle_ttl_s is not None:
        parts.append(f"idle {human_duration(info.idle_ttl_s)}")
    return ", ".join(p for p in parts if p) or "-"


def _show(details: ModelDetails, out: TextIO) -> None:
    info = details.info
    rows: list[tuple[str, str]] = []
    if info is not None:
        rows += [("state", f"{_state(info)} ({_policy(info)})"), ("size", human_size(info.size))]
    rows += [(k.replace("_", " "), str(details.details[k])) for k in _DETAILS if k in details.details]
    if details.capabilities:
        rows.append(("capabilities", ", ".join(details.capabilities)))
    print(f"{details.model} on {details.host}", file=out)
    for key, value in rows:
        print(f"  {key:<20} {value}", file=out)
    if details.modelfile:
        print("\n" + details.modelfile.rstrip(), file=out)
