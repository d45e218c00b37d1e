"""Fuzz the edge's HTTP API from its own OpenAPI document with schemathesis.

Runs the whole stack in this process (a real nats-server, the fake Ollama, generator, embedder,
classifier, janitor and the edge), then `st run` against `/schema/openapi.json`, checking that no
generated request gets a 5xx or hangs. Prints the case count and the verdict as one JSON line.

    python scripts/fuzz_edge.py --max-examples 60    # about 1,000+ cases; docs/reliability.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.classifier.main import Classifier  # noqa: E402
from services.edge.tenants import hash_key  # noqa: E402
from services.embedder.main import Embedder  # noqa: E402
from services.generator.main import Generator  # noqa: E402
from services.janitor.main import JanitorService  # noqa: E402
from services.ledger.main import LedgerService  # noqa: E402
from services.runtime.nats_server import NatsServer, free_port  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from tests.conftest import Edge  # noqa: E402
from tests.fakes.ollama import FakeConfig, FakeOllama  # noqa: E402

# A request that is slower than this counts as a hang (every answer of the fake comes at once).
REQUEST_TIMEOUT_S = 20
KEY = "llmbus_fuzzing_key"


async def fuzz(max_examples: int, seed: int, workers: int, *, auth: bool = True) -> dict[str, Any]:
    """With `auth`, the edge wants API keys (LLMBUS_AUTH=on) and every case sends an admin one,
    so the admission code runs on every request."""
    with tempfile.TemporaryDirectory() as tmp:
        tenants = Path(tmp) / "tenants.toml"
        tenants.write_text(
            f'[tenants.fuzz]\nkeys = ["{hash_key(KEY)}"]\nadmin = true\n'
            "max_inflight = 64\nrequests_per_minute = 1000000\ntokens_per_minute = 1000000000\n"
        )
        server = await NatsServer(Path(tmp) / "nats").astart()
        async with FakeOllama(FakeConfig()) as fake:
            settings = Settings(
                nats_url=server.url,
                ollama_url=fake.url,
                http_port=free_port(),
                max_body_bytes=64 * 1024,
                request_timeout_s=15.0,
                models_file=str(Path(tmp) / "models.toml"),
                database_url=f"sqlite:///{Path(tmp) / 'ledger.db'}",
                log_level="error",
                auth="on" if auth else "off",
                tenants_file=str(tenants),
            )
            services = [
                Generator(settings),
                Embedder(settings),
                Classifier(settings),
                JanitorService(settings),
                LedgerService(settings),  # /v1/usage, /v1/stats, /v1/history
            ]
            for service in services:
                await service.start()
            try:
                async with Edge(settings) as edge:
                    headers = [f"Authorization: Bearer {KEY}"] if auth else []
                    result = await _run_schemathesis(
                        edge.url, max_examples, seed, workers, tmp=Path(tmp), headers=headers
                    )
                    return {**result, "auth": auth}
            finally:
                for service in reversed(services):
                    await service.stop(grace=0)
                await server.astop()


async def _run_schemathesis(
    url: str, max_examples: int, seed: int, workers: int, *, tmp: Path, headers: list[str]
) -> dict[str, Any]:
    # The `st` next to this interpreter (its virtualenv's bin need not be on PATH), else PATH's.
    beside = Path(sys.executable).parent / "st"
    st = str(beside) if beside.exists() else shutil.which("st") or "st"
    command = [
        st,
        "run",
        f"{url}/schema/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--phases",
        "examples,coverage,fuzzing",
        "--continue-on-failure",
        "--no-color",
        *(arg for header in headers for arg in ("--header", header)),
        "--report",
        "junit",
        "--report-dir",
        str(tmp / "report"),
    ]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    cases = _cases(text)
    return {
        "cases": cases,
        "exit_code": proc.returncode,
        "passed": proc.returncode == 0,
        "seconds": round(time.monotonic() - started, 1),
        "max_examples": max_examples,
        "output": text,
    }


def _cases(text: str) -> int:
    """The total in schemathesis' summary line `Test cases: N generated, ...`."""
    match = re.search(r"Test cases:\s*([\d,]+)\s*generated", text)
    return int(match.group(1).replace(",", "")) if match else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=8)
    # One worker: hypothesis' lambda descriptions call ast.parse, not thread-safe on CPython 3.11.
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--show-output", action="store_true", help="print schemathesis' own report too")
    parser.add_argument("--no-auth", action="store_true", help="fuzz the edge with LLMBUS_AUTH=off")
    args = parser.parse_args()
    result = asyncio.run(fuzz(args.max_examples, args.seed, args.workers, auth=not args.no_auth))
    output = result.pop("output")
    if args.show_output or not result["passed"]:
        print(output)
    print(json.dumps(result))
    sys.exit(0 if result["passed"] and result["cases"] > 0 else 1)


if __name__ == "__main__":
    main()
