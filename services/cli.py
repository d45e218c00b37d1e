"""The `llmbus` command: `llmbus up` runs the whole local stack; the others run one service."""

from __future__ import annotations

import argparse
import importlib
import sys

from services.janitor import cli as models_cli
from services.runtime.settings import Settings

# Every long-running service: `llmbus NAME` runs `services.NAME.main.main(settings)`, and
# `llmbus up` starts each as its own process, in this order.
SERVICES = ("generator", "embedder", "classifier", "janitor", "edge")
# Started by `llmbus up` only when needed: the embedded model servers (the `local` extra).
ON_DEMAND = ("local",)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run embedded NATS and every service as its own process (Ctrl-C stops all)")
    for name in (*SERVICES, *ON_DEMAND):
        sub.add_parser(name, help=f"run the {name} service")
    models_cli.add_parser(sub)  # `llmbus models ...`: a command, not a service
    export = sub.add_parser("contracts", help="write JSON Schema and AsyncAPI documents of the wire contract")
    export.add_argument("--check", action="store_true", help="fail if the checked-in export is stale")
    from services import dlq

    dlq.add_parser(sub)
    from services.edge import tenants

    tenants.add_parser(sub)  # `llmbus keys new|hash`
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    if args.command == "up":
        from services.up import up

        sys.exit(up(settings))
    if args.command in (*SERVICES, *ON_DEMAND):
        importlib.import_module(f"services.{args.command}.main").main(settings)
    elif args.command == "models":
        sys.exit(models_cli.main(args, settings))
    elif args.command == "contracts":
        from contracts.export import main as export_main

        sys.exit(export_main(check=args.check))
    elif args.command == "dlq":
        sys.exit(dlq.main(args, settings))
    elif args.command == "keys":
        sys.exit(tenants.main(args))


if __name__ == "__main__":
    main()
