"""Tasks: structured generation presets over the normal bus path, against the fake Ollama."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.edge.task_catalog import TaskFileError, load_tasks
from tests.fakes.ollama import Call, FakeOllama
from tests.sse import collect

COURSE = {"content": "Intro to Python: variables, loops, functions; final project: a CLI to-do app."}


def chats(fake: FakeOllama) -> list[Call]:
    return [call for call in fake.calls if call.path == "/api/chat"]


async def test_badge_task_streams_tokens_and_ends_with_a_valid_ob3_achievement(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    async with client.stream("POST", "/v1/tasks/badge", json={"input": COURSE, "stream": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        events = await collect(response)

    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    tokens = "".join(e.data["text"] for e in events if e.event == "token")
    achievement = events[-1].data["output"]
    # What OB 3.0 requires of an Achievement, whatever the model wrote.
    assert achievement["type"] == ["Achievement"]
    assert achievement["id"] == f"urn:uuid:{request_id[:8]}-{request_id[8:12]}-{request_id[12:16]}-" + (
        f"{request_id[16:20]}-{request_id[20:]}"
    )
    assert {"name", "description", "criteria", "achievementType", "tag"} <= set(achievement)
    assert achievement["criteria"]["narrative"]
    assert '"name"' in tokens  # the raw JSON streamed token by token
    [call] = chats(fake_ollama)
    # The model's schema is the output schema without the fields the edge fills in.
    assert "id" not in call.body["format"]["properties"] and "name" in call.body["format"]["required"]
    assert COURSE["content"] in call.body["messages"][-1]["content"]
    assert call.body["options"]["temperature"] == 0.2


async def test_caller_supplied_id_and_options_override_the_task_defaults(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    body = {
        "input": {**COURSE, "id": "https://example.org/badges/python-101"},
        "model": "qwen2.5:0.5b",
        "options": {"temperature": 0.7},
    }
    response = await client.post("/v1/tasks/badge", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["output"]["id"] == "https://example.org/badges/python-101"
    assert result["model"] == "qwen2.5:0.5b" and result["attempts"] == 1
    assert result["text"].lstrip().startswith("{")
    sent = chats(fake_ollama)[-1].body
    assert sent["model"] == "qwen2.5:0.5b"
    assert sent["options"]["temperature"] == 0.7 and sent["options"]["num_predict"] == 1024


async def test_invalid_answer_is_retried_once_with_the_validation_error(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.invalid_format_times = 1
    async with client.stream("POST", "/v1/tasks/badge", json={"input": COURSE, "stream": True}) as response:
        events = await collect(response)

    kinds = [e.event for e in events]
    assert kinds.count("retry") == 1 and kinds.count("start") == 2 and kinds[-1] == "done"
    retry = events[kinds.index("retry")].data
    assert "$.name is required" in retry["reason"]
    assert events[-1].data["output"]["type"] == ["Achievement"]
    first, second = chats(fake_ollama)
    assert second.body["messages"][:-2] == first.body["messages"]
    assert second.body["messages"][-2] == {"role": "assistant", "content": "{}"}
    assert "$.name is required" in second.body["messages"][-1]["content"]


async def test_answer_invalid_twice_fails_with_invalid_output_and_the_raw_text(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.invalid_format_times = 2
    async with client.stream("POST", "/v1/tasks/badge", json={"input": COURSE, "stream": True}) as response:
        assert response.status_code == 200
        events = await collect(response)
    assert [e.event for e in events].count("retry") == 1
    error = events[-1]
    assert error.event == "error" and error.data["code"] == "invalid_output"
    assert "$.name is required" in error.data["message"] and "raw output: {}" in error.data["message"]
    assert len(chats(fake_ollama)) == 2  # exactly one retry

    fake_ollama.config.invalid_format_times = 2
    response = await client.post("/v1/tasks/badge", json={"input": COURSE})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "invalid_output"
    assert "raw output: {}" in response.json()["error"]["message"]


async def test_answer_cut_off_by_the_token_limit_is_invalid_output(client: httpx.AsyncClient) -> None:
    body = {"input": {"text": "A long text."}, "options": {"num_predict": 3}}
    response = await client.post("/v1/tasks/summarise", json=body)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "invalid_output"
    assert "cut off at the token limit" in error["message"]


async def test_extract_validates_against_the_callers_schema(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    schema = {
        "type": "object",
        "properties": {"person": {"type": "string"}, "age": {"type": "integer", "minimum": 18}},
        "required": ["person", "age"],
    }
    body = {"input": {"text": "Ada Lovelace was 36.", "schema": schema}}
    response = await client.post("/v1/tasks/extract", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"person": "x", "age": 18}
    sent = chats(fake_ollama)[-1].body
    assert sent["format"] == schema
    assert '"required": ["person", "age"]' in sent["messages"][-1]["content"]


BAD_INPUTS: list[tuple[str, dict[str, object], str]] = [
    ("badge", {"input": {}}, "input.content is required"),
    ("badge", {"input": {"content": ""}}, "input.content"),
    ("badge", {"input": {**COURSE, "colour": "red"}}, "input.colour is not allowed"),
    ("badge", {"input": {**COURSE, "id": "not a uri"}}, "input.id"),
    ("summarise", {"input": {"text": "hi", "max_words": 2}}, "input.max_words"),
    ("extract", {"input": {"text": "hi", "schema": {"type": "nope"}}}, "input.schema"),
    ("badge", {"input": COURSE, "model": "bad model!"}, "invalid model name"),
    ("badge", {"content": "inputs go in `input`"}, "unknown field `content`"),
]


async def test_bad_task_input_is_bad_request_naming_the_field(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    for task, body, field in BAD_INPUTS:  # one stack for every case: each costs a request, not a setup
        response = await client.post(f"/v1/tasks/{task}", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == "bad_request" and field in error["message"], (body, error)
    assert chats(fake_ollama) == []  # none reached a worker


async def test_unknown_task_is_not_found(client: httpx.AsyncClient) -> None:
    for response in (
        await client.post("/v1/tasks/horoscope", json={"input": {}}),
        await client.get("/v1/tasks/horoscope"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_task_list_shows_input_and_output_schemas(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/tasks")
    assert response.status_code == 200
    tasks = {t["name"]: t for t in response.json()["tasks"]}
    assert set(tasks) >= {"badge", "summarise", "extract"}
    badge = tasks["badge"]
    assert badge["input_schema"]["required"] == ["content"]
    assert {"id", "type", "name", "description", "criteria"} <= set(badge["output_schema"]["required"])
    assert badge["model"] and badge["options"]["temperature"] == 0.2
    assert tasks["extract"]["output_schema_input"] == "schema" and "output_schema" not in tasks["extract"]
    one = await client.get("/v1/tasks/summarise")
    assert one.json() == tasks["summarise"]


def test_a_broken_task_file_is_refused_at_load_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "oops.toml").write_text(
        'model = "m"\ntemplate = "$missing"\n[input_schema]\ntype = "object"\nproperties = {}\n'
        '[output_schema]\ntype = "object"\n'
    )
    with pytest.raises(TaskFileError, match=r"oops\.toml.*'missing'"):
        load_tasks(tmp_path)
