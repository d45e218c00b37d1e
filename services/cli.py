"""The `llmbus` command: `llmbus up` runs the whole local stack; the others run one service."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from services import dlq, provision, queue_cli
from services.edge import tenants
from services.janitor import cli as models_cli
from services.ledger import cli as ledger_cli
from services.runtime.bus import NatsUnreachable
from services.runtime.settings import PREFIX, Settings, unknown_variables, variables_help
from services.up import ON_DEMAND, SERVICES, up


def version() -> str:
    try:
        return importlib.metadata.version("llmbus")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="llmbus", description=__doc__)
    top.add_argument("--version", action="version", version=f"llmbus {version()}")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run embedded NATS and every service as its own process (Ctrl-C stops all)")
    for name in (*SERVICES, *ON_DEMAND):
        sub.add_parser(name, help=f"run the {name} service")
    models_cli.add_parser(sub)  # `llmbus models ...`: a command, not a service
    export = sub.add_parser("contracts", help="write JSON Schema and AsyncAPI documents of the wire contract")
    export.add_argument("--check", action="store_true", help="fail if the checked-in export is stale")
    dlq.add_parser(sub)
    ledger_cli.add_parser(sub)  # `llmbus usage`, `llmbus stats`, `llmbus erase`
    queue_cli.add_parser(sub)  # `llmbus queue`
    tenants.add_parser(sub)  # `llmbus keys new|hash`
    sub.add_parser("provision", help="create the streams and apply changed settings to them (as admin)")
    sub.add_parser("config", help="print every effective setting and where it comes from")
    for name, command in sub.choices.items():
        if variables_help(name).count("\n"):
            command.epilog = variables_help(name)
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return top


def show_config(settings: Settings) -> int:
    """Every setting, its effective value and its source; then the unknown `LLMBUS_*` variables."""
    sources = Settings.sources()
    for name in Settings.__struct_fields__:
        value = settings.text(name)
        shown = "***" if value and (name.endswith("password") or name.endswith("api_key")) else value
        print(f"{PREFIX}{name.upper():<34} {shown!s:<32} {sources[name]}")
    for warning in unknown_variables():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        sys.exit(_run(args, settings))
    except NatsUnreachable as exc:  # one line, no traceback: what to fix is in it
        print(exc, file=sys.stderr)
        sys.exit(1)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "up":
        return up(settings)
    if args.command in (*SERVICES, *ON_DEMAND):
        importlib.import_module(f"services.{args.command}.main").main(settings)
        return 0
    if args.command == "models":
        return models_cli.main(args, settings)
    if args.command == "contracts":
        from contracts.export import main as export_main

        return export_main(check=args.check)
    if args.command == "dlq":
        return dlq.main(args, settings)
    if args.command in ("usage", "stats", "erase"):
        return ledger_cli.main(args, settings)
    if args.command == "queue":
        return queue_cli.main(args, settings)
    if args.command == "provision":
        return provision.main(settings)
    if args.command == "keys":
        return tenants.main(args)
    return show_config(settings)


if __name__ == "__main__":
    main()
