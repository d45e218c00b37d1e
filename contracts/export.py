"""Exports the wire contract as JSON Schema files and an AsyncAPI 3 document.

`llmbus contracts` rewrites `contracts/schemas/*.json` and `contracts/asyncapi.yaml`;
`llmbus contracts --check` fails when they differ from the code (a test runs it), so teams that do
not use Python can rely on the checked-in files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from contracts.asyncapi import asyncapi
from contracts.embed import Embeddings, EmbedRequest, EmbedResponse, Vectors
from contracts.ledger import (
    HistoryPage,
    RequestRecord,
    Spend,
    StatsReport,
    UsageReport,
)
from contracts.messages import (
    Accepted,
    Completion,
    Done,
    Error,
    ErrorBody,
    Event,
    GenerateRequest,
    Restart,
    Start,
    Thinking,
    Token,
    ToolCallEvent,
)
from contracts.models import (
    CopyRequest,
    CreateRequest,
    LoadRequest,
    ModelDetails,
    ModelEvent,
    ModelInfo,
    ModelList,
    ModelRef,
    OpAccepted,
    PullRequest,
    UsageEvent,
)
from contracts.queue import Queued, QueueReport
from contracts.route import ClassifyReply, ClassifyRequest, Routed
from contracts.schema_form import normalised

HERE = Path(__file__).parent
SCHEMAS = HERE / "schemas"
ASYNCAPI = HERE / "asyncapi.yaml"

MESSAGES: dict[str, Any] = {
    "GenerateRequest": GenerateRequest,
    "Event": Event,
    "Start": Start,
    "Routed": Routed,
    "Token": Token,
    "Thinking": Thinking,
    "ToolCallEvent": ToolCallEvent,
    "Restart": Restart,
    "Done": Done,
    "Error": Error,
    "ErrorBody": ErrorBody,
    "Completion": Completion,
    "Accepted": Accepted,
    "EmbedRequest": EmbedRequest,
    "Vectors": Vectors,
    "Embeddings": Embeddings,
    "EmbedResponse": EmbedResponse,
    "ClassifyRequest": ClassifyRequest,
    "ClassifyReply": ClassifyReply,
    "UsageEvent": UsageEvent,
    "ModelInfo": ModelInfo,
    "ModelEvent": ModelEvent,
    "ModelRef": ModelRef,
    "PullRequest": PullRequest,
    "CreateRequest": CreateRequest,
    "CopyRequest": CopyRequest,
    "LoadRequest": LoadRequest,
    "OpAccepted": OpAccepted,
    "ModelList": ModelList,
    "ModelDetails": ModelDetails,
    "UsageReport": UsageReport,
    "StatsReport": StatsReport,
    "HistoryPage": HistoryPage,
    "RequestRecord": RequestRecord,
    "Spend": Spend,
    "Queued": Queued,
    "QueueReport": QueueReport,
}

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:llmbus:contracts:schemas:{name}.json"  # a stable name, not a download address


def _schema(name: str, tp: Any) -> dict[str, Any]:
    """One message type's JSON Schema file, self-describing: its dialect and its own id."""
    schema = dict(normalised(msgspec.json.schema(tp)))
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": SCHEMA_ID.format(name=name), **schema}


def json_schemas() -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(_schema(name, tp), indent=2, sort_keys=True) + "\n"
        for name, tp in MESSAGES.items()
    }


def expected_files() -> dict[Path, str]:
    files = {SCHEMAS / name: text for name, text in json_schemas().items()}
    files[ASYNCAPI] = asyncapi()
    return files


def main(check: bool = False) -> int:
    stale = [path for path, text in expected_files().items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"stale: {path} (run `llmbus contracts`)", file=sys.stderr)
        return 1 if stale else 0
    SCHEMAS.mkdir(exist_ok=True)
    for path, text in expected_files().items():
        path.write_text(text)
    print(f"wrote {len(expected_files())} files under {HERE}")
    return 0
