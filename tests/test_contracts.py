"""The wire contract: subject encoding, validation, and the exported schema documents."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts import ErrorCode, GenerateRequest, LlmbusError, Message, Options, subjects
from contracts.export import main as export_main
from contracts.schema_form import normalised as _normalised


@pytest.mark.parametrize(
    "model", ["llama3.2:3b", "qwen2.5-coder:1.5b", "hf.co/org/m.gguf:Q4_K_M", "a%2Eb", "x"]
)
def test_model_subject_encoding_round_trips(model: str) -> None:
    subject = subjects.generate_subject(model)
    assert subject.count(".") == 3  # llm.req.generate.<one token>
    assert subjects.model_from_subject(subject) == model


def test_exported_schemas_are_current() -> None:
    assert export_main(check=True) == 0, "run `llmbus contracts` and commit the result"


class _Indented(msgspec.Struct):
    """First line.

    An indented second paragraph, as docstrings are written.
    """

    text: str


def test_exported_descriptions_do_not_depend_on_the_msgspec_version() -> None:
    # msgspec 0.22 exports a docstring as written, 0.23 dedents it: the export dedents both ways.
    raw = {"description": _Indented.__doc__, "properties": {"x": {"description": "  a\n    b"}}}
    assert _normalised(raw) == {
        "description": "First line.\n\nAn indented second paragraph, as docstrings are written.",
        "properties": {"x": {"description": "a\nb"}},
    }
    assert _normalised(msgspec.json.schema(_Indented)) == _normalised(
        _normalised(msgspec.json.schema(_Indented))
    )


def test_every_error_code_maps_to_an_http_status() -> None:
    statuses = {400, 401, 403, 404, 413, 429, 499, 500, 501, 502, 503, 504}
    assert {code.http_status for code in ErrorCode} <= statuses
    assert ErrorCode.QUEUE_FULL.http_status == 503


_INVALID: list[dict[str, Any]] = [
    {"id": "short", "model": "m", "prompt": "x"},
    {"id": "abcdefgh", "model": "bad model", "prompt": "x"},
    {"id": "abcdefgh", "model": "m"},
    {"id": "abcdefgh", "model": "m", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    {"id": "abcdefgh", "model": "m", "messages": []},
    {"id": "abcdefgh", "model": "m", "prompt": "x", "options": {"num_predict": 0}},
]


def _built(fields: dict[str, Any]) -> GenerateRequest:
    extra: dict[str, Any] = {"options": Options(**fields.get("options", {}))}
    if "messages" in fields:
        extra["messages"] = [Message(**m) for m in fields["messages"]]
    return GenerateRequest(**(fields | extra))


@pytest.mark.parametrize("fields", _INVALID)
def test_validation_refuses_requests_a_worker_cannot_run(fields: dict[str, Any]) -> None:
    # Built in code (the edge): the cross-field rules at construction, the typed ones by `validate`.
    with pytest.raises(LlmbusError) as info:
        _built(fields).validate()
    assert info.value.code is ErrorCode.BAD_REQUEST
    # Decoded (a worker, or any publisher's message): refused as well.
    with pytest.raises((LlmbusError, msgspec.ValidationError)):
        msgspec.json.decode(msgspec.json.encode(fields), type=GenerateRequest)


def test_the_schema_carries_the_id_and_model_rules() -> None:
    schema = json.loads((Path(__file__).parent.parent / "contracts/schemas/GenerateRequest.json").read_text())
    fields = schema["$defs"]["GenerateRequest"]["properties"]
    assert re.fullmatch(fields["id"]["pattern"], "abcdefgh") and not re.fullmatch(
        fields["id"]["pattern"], "a.b"
    )
    assert "pattern" in fields["model"]
