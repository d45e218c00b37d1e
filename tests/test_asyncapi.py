"""contracts/asyncapi.yaml as tools nobody on the project wrote see it: the official AsyncAPI parser
(`@asyncapi/parser`, run with Node; `scripts/test.sh` installs it into tests/node/node_modules), and
every subject the code publishes on, derived from contracts/subjects.py, present as a channel."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from contracts import route, subjects
from contracts.export import ASYNCAPI, SCHEMAS
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.test_admission import with_auth

NODE_DIR = Path(__file__).parent / "node"
PARSER = NODE_DIR / "node_modules" / "@asyncapi" / "parser"

# A value for each parameter name the subject builders take, as the code would pass it.
_SAMPLES = {
    "model": "llama3.2:1b",
    "request_id": "req_0123456789abcdef",
    "service": "generator",
    "host": "gpu-1.local",
    "verb": "pull",
}


def _official_parse() -> dict[str, object]:
    node = shutil.which("node")
    if node is None or not PARSER.is_dir():
        pytest.skip("needs Node and @asyncapi/parser: ./scripts/test.sh installs it (npm ci in tests/node)")
    done = subprocess.run(
        [node, str(NODE_DIR / "parse_asyncapi.cjs"), str(ASYNCAPI)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_official_parser_accepts_the_contract() -> None:
    parsed = _official_parse()
    problems = [d for d in parsed["diagnostics"] if d["severity"] in ("error", "warning")]  # type: ignore[attr-defined]
    assert problems == []
    assert parsed["channels"], "the parser returned no document"


def _subject_builders() -> list[Callable[..., str]]:
    """Every `*_subject(...)` of contracts/subjects.py that builds a subject (not one that reads one)."""
    return [
        fn
        for name, fn in inspect.getmembers(subjects, inspect.isfunction)
        if name.endswith("_subject") and "subject" not in inspect.signature(fn).parameters
    ]


def _published_subjects() -> list[str]:
    out = [route.ROUTE_SUBJECT, route.CLASSIFY_SUBJECT]
    for fn in _subject_builders():
        params = inspect.signature(fn).parameters
        out.append(
            fn(*(_SAMPLES[name] for name, p in params.items() if p.default is inspect.Parameter.empty))
        )
        optional = [name for name, p in params.items() if p.default is not inspect.Parameter.empty]
        if optional:  # e.g. admin_subject(verb, host): both forms are used
            out.append(fn(*(_SAMPLES[name] for name in params)))
    return out


def _address_pattern(address: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", address)
    return re.compile("".join("[^.]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def test_builders_are_found() -> None:
    names = {fn.__name__ for fn in _subject_builders()}
    assert {"generate_subject", "accepted_subject", "dead_letter_subject", "admin_subject"} <= names


@pytest.mark.parametrize("subject", _published_subjects())
def test_every_published_subject_is_a_channel(subject: str) -> None:
    doc = yaml.safe_load(ASYNCAPI.read_text())
    addresses = [c["address"] for c in doc["channels"].values() if c.get("address")]
    matching = [a for a in addresses if _address_pattern(a).match(subject)]
    assert matching, f"{subject} is published by llmbus but no channel of asyncapi.yaml has its address"


def test_every_json_schema_names_its_dialect_and_id() -> None:
    files = sorted(SCHEMAS.glob("*.json"))
    assert len(files) >= 28
    ids = set()
    for path in files:
        schema = json.loads(path.read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", path.name
        assert schema["$id"].endswith(f"{path.stem}.json"), path.name
        ids.add(schema["$id"])
    assert len(ids) == len(files)


async def test_the_edge_serves_the_contract_as_a_page(settings: Settings, tmp_path: Path) -> None:
    # With API keys on: the contract is public, as the OpenAPI document is.
    async with Edge(with_auth(settings, tmp_path)) as edge, httpx.AsyncClient(base_url=edge.url) as http:
        page = await http.get("/contract")
        document = await http.get("/contract/asyncapi.yaml")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for address in ("llm.req.generate.{model}", "llm.out.{requestId}.accepted", "llm.dlq.{service}"):
        assert f"<code>{address}</code>" in page.text
    assert 'href="#schemas-GenerateRequest"' in page.text  # $refs link to their schema
    assert document.status_code == 200 and document.content == ASYNCAPI.read_bytes()
