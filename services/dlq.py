"""`llmbus dlq list|replay`: the requests workers gave up on (stream `LLM_DLQ`).

llmbus dlq list                  # seq, when, service, reason, request id, subject
llmbus dlq replay 3 7            # publish dead letters 3 and 7 again (new request ids)
llmbus dlq replay --all --keep   # every dead letter, keeping the copies
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from services.runtime import bus, dlq
from services.runtime.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("dlq", help="list or replay dead-lettered requests (stream LLM_DLQ)")
    verbs = parser.add_subparsers(dest="dlq_command", required=True)
    listing = verbs.add_parser("list", help="show the dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=1000)
    again = verbs.add_parser("replay", help="publish dead letters again, each under a new request id")
    again.add_argument("seqs", nargs="*", type=int, help="sequence numbers from `llmbus dlq list`")
    again.add_argument("--all", action="store_true", help="every dead letter")
    again.add_argument("--keep", action="store_true", help="keep the dead letters after replaying them")


def main(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    if args.dlq_command == "replay" and not args.seqs and not args.all:
        print("llmbus dlq replay: name sequence numbers or --all", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, settings, out))


async def _run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    nc = await bus.connect(settings, "llmbus-dlq")
    try:
        await bus.provision(nc.jetstream(), settings)
        if args.dlq_command == "list":
            return await _list(nc, args.limit, out)
        return await _replay(nc, args, out)
    finally:
        await nc.drain()


async def _list(nc: Client, limit: int, out: TextIO) -> int:
    entries = await dlq.entries(nc, limit)
    if not entries:
        print("no dead letters", file=out)
        return 0
    print(f"{'SEQ':>5}  {'WHEN (UTC)':19}  {'SERVICE':10}  {'TRIES':>5}  {'REQUEST':32}  REASON", file=out)
    for entry in entries:
        when = entry.time.strftime("%Y-%m-%d %H:%M:%S") if entry.time else "?"
        print(
            f"{entry.seq:>5}  {when:19}  {entry.service:10}  {entry.deliveries:>5}  "
            f"{entry.request_id or '-':32}  {entry.reason}  [{entry.subject}]",
            file=out,
        )
    return 0


async def _replay(nc: Client, args: argparse.Namespace, out: TextIO) -> int:
    entries = await dlq.entries(nc, limit=1_000_000)
    chosen = entries if args.all else [e for e in entries if e.seq in set(args.seqs)]
    missing = set(args.seqs) - {e.seq for e in entries}
    for seq in sorted(missing):
        print(f"no dead letter {seq}", file=sys.stderr)
    for entry in chosen:
        try:
            new_id = await dlq.replay(nc, entry, keep=args.keep)
        except NotFoundError:
            print(f"dead letter {entry.seq}: gone meanwhile", file=sys.stderr)
            continue
        print(f"replayed {entry.seq} as {new_id or '(the same raw message)'} on {entry.subject}", file=out)
    return 1 if missing else 0
