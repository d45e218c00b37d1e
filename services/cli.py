"""The `llmbus` command: `llmbus up` runs the whole local stack; the others run one service."""

from __future__ import annotations

import argparse
import importlib
import sys

from services.runtime.settings import Settings

# Every long-running service: `llmbus NAME` runs `services.NAME.main.main(settings)`, and
# `llmbus up` starts each as its own process, in this order.
SERVICES = ("generator", "edge")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run embedded NATS and every service as its own process (Ctrl-C stops all)")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service")
    export = sub.add_parser("contracts", help="write JSON Schema and AsyncAPI documents of the wire contract")
    export.add_argument("--check", action="store_true", help="fail if the checked-in export is stale")
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "up":
        from services.up import up

        sys.exit(up(settings))
    if args.command in SERVICES:
        importlib.import_module(f"services.{args.command}.main").main(settings)
    elif args.command == "contracts":
        from contracts.export import main as export_main

        sys.exit(export_main(check=args.check))


if __name__ == "__main__":
    main()
