"""Tasks as data: structured-generation presets loaded from `infra/tasks/*.toml`.

A task file holds a system prompt, an input `template` (``$field`` placeholders), a JSON Schema for
its inputs and one for its output, a default model and default options. `output_schema_input` names
an input that carries the output schema instead (the `extract` task). `fill` lists output fields the
edge sets after the model answers (values are templates over the inputs and ``$uuid``; an input of
the same name replaces the value): the model's `format` is the output schema without them, so a
model never has to invent identifiers or constants.

Everything that can be wrong with a file is found when it is loaded, so a broken task stops the edge
at start instead of failing requests.
"""

from __future__ import annotations

import json
import re
import string
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from contracts import ErrorCode, LlmbusError, Message, Options

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "infra" / "tasks"
_KEYS = {
    "description",
    "model",
    "system",
    "template",
    "options",
    "input_schema",
    "output_schema",
    "output_schema_input",
    "fill",
}
_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")
_MAX_ERROR = 400  # characters of one validation message (messages can quote a whole instance)


class TaskFileError(Exception):
    """A task file that cannot be used; the message names the file and the problem."""


class InvalidOutput(Exception):
    """The model's text is not JSON, or not an instance of the output schema."""


class TaskInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A task as `GET /v1/tasks` lists it."""

    name: str
    description: str
    model: str
    options: Options
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None  # None: the caller's input `output_schema_input` is it
    output_schema_input: str | None = None


@dataclass(frozen=True)
class Prepared:
    """One request of a task: its prompt, its `format` and how to accept the answer."""

    messages: list[Message]
    format: dict[str, Any]  # what the model must produce (the output schema minus `fill`)
    fill: dict[str, Any]
    output: Draft202012Validator  # what the client gets: checked after `fill`

    def accept(self, text: str, truncated: bool = False) -> Any:
        """The parsed, filled and validated object; raises `InvalidOutput` saying what is wrong."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            cut = " (the answer was cut off at the token limit)" if truncated else ""
            raise InvalidOutput(f"not valid JSON{cut}: {exc}") from None
        _check(Draft202012Validator(self.format), value, "$", InvalidOutput)
        if self.fill and isinstance(value, dict):
            value = {**self.fill, **value} | self.fill  # filled fields first, and they win
        _check(self.output, value, "$", InvalidOutput)
        return value


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model: str
    options: Options
    system: str
    template: string.Template
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    output_schema_input: str | None
    fill: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> TaskInfo:
        return TaskInfo(**{name: getattr(self, name) for name in TaskInfo.__struct_fields__})

    def prepare(self, inputs: dict[str, Any], request_id: str) -> Prepared:
        """Validates `inputs` (raises `bad_request` naming the field) and renders the request."""
        _check(Draft202012Validator(self.input_schema), inputs, "input", _bad_input)
        values = {**_defaults(self.input_schema), **inputs}
        schema = self.output_schema
        if self.output_schema_input is not None:
            schema = values[self.output_schema_input]
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise LlmbusError(
                    ErrorCode.BAD_REQUEST,
                    f"input.{self.output_schema_input} is not a valid JSON Schema: {_short(exc.message)}",
                ) from None
        assert schema is not None  # a task has one or the other (checked at load)
        text = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in values.items()}
        text["uuid"] = _uuid_of(request_id)
        fill = {k: values[k] if k in inputs else _render(v, text) for k, v in self.fill.items()}
        prompt = _BLANK_LINES.sub("\n\n", self.template.substitute(text)).strip()  # unset inputs leave gaps
        messages = [Message(role="user", content=prompt)]
        if self.system:
            messages.insert(0, Message(role="system", content=self.system))
        return Prepared(
            messages=messages,
            format=_without(schema, self.fill),
            fill=fill,
            output=Draft202012Validator(schema),
        )


def load_tasks(directory: Path | str | None = None) -> dict[str, Task]:
    """Every `*.toml` in `directory` (default `infra/tasks`), by file name; raises `TaskFileError`."""
    folder = Path(directory) if directory else DEFAULT_DIR
    if not folder.is_dir():
        raise TaskFileError(f"task directory {folder} does not exist (LLMBUS_TASKS_DIR)")
    return {path.stem: load_task(path) for path in sorted(folder.glob("*.toml"))}


def load_task(path: Path) -> Task:
    try:
        raw = tomllib.loads(path.read_text())
        return _parse(path.stem, raw)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, SchemaError) as exc:
        detail = exc.message if isinstance(exc, SchemaError) else str(exc)
        raise TaskFileError(f"task file {path}: {detail}") from exc


def _parse(name: str, raw: dict[str, Any]) -> Task:
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}")
    input_schema = raw["input_schema"]
    Draft202012Validator.check_schema(input_schema)
    if input_schema.get("type") != "object" or not isinstance(input_schema.get("properties"), dict):
        raise ValueError("input_schema must be an object schema with properties")
    inputs = set(input_schema["properties"])
    output_schema = raw.get("output_schema")
    from_input = raw.get("output_schema_input")
    if (output_schema is None) == (from_input is None):
        raise ValueError("exactly one of output_schema or output_schema_input is required")
    if output_schema is not None:
        Draft202012Validator.check_schema(output_schema)
    elif from_input not in inputs:
        raise ValueError(f"output_schema_input {from_input!r} is not an input")
    fill = raw.get("fill", {})
    if fill and (output_schema is None or not set(fill) <= set(output_schema.get("properties", {}))):
        raise ValueError("fill may only set properties of output_schema")
    template = string.Template(raw["template"])
    if not template.is_valid():
        raise ValueError("template has an invalid $ placeholder")
    placeholders = set(template.get_identifiers())
    for value in fill.values():
        if isinstance(value, str):
            placeholders |= set(string.Template(value).get_identifiers())
    missing = placeholders - inputs - {"uuid"}
    if missing:
        raise ValueError(f"placeholders {sorted(missing)} are not inputs")
    return Task(
        name=name,
        description=str(raw.get("description", "")),
        model=str(raw["model"]),
        options=msgspec.convert(raw.get("options", {}), Options),
        system=str(raw.get("system", "")).strip(),
        template=template,
        input_schema=input_schema,
        output_schema=output_schema,
        output_schema_input=from_input,
        fill=fill,
    )


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level `default`s, and "" for the other optional inputs a template may name."""
    props: dict[str, Any] = schema.get("properties", {})
    return {k: p.get("default", "") if isinstance(p, dict) else "" for k, p in props.items()}


def _without(schema: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    if not fields:
        return schema
    trimmed = dict(schema)
    trimmed["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k not in fields}
    if "required" in schema:
        trimmed["required"] = [k for k in schema["required"] if k not in fields]
    return trimmed


def _uuid_of(request_id: str) -> str:
    """The request id as a UUID (edge ids are UUID hex), else a UUID derived from it."""
    try:
        return str(uuid.UUID(hex=request_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmbus:{request_id}"))


def _render(value: Any, text: Mapping[str, str]) -> Any:
    return string.Template(value).substitute(text) if isinstance(value, str) else value


def _short(message: str) -> str:
    return message if len(message) <= _MAX_ERROR else message[: _MAX_ERROR - 1] + "…"


def _describe(error: ValidationError, root: str) -> str:
    path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        if missing:
            return f"{path}.{missing[0]} is required"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            return f"{path}.{extra[0]} is not allowed"
    return f"{path}: {_short(error.message)}"


def _bad_input(message: str) -> LlmbusError:
    return LlmbusError(ErrorCode.BAD_REQUEST, f"invalid task input: {message}")


def _check(validator: Draft202012Validator, value: Any, root: str, fail: Callable[[str], Exception]) -> None:
    error = best_match(validator.iter_errors(value))
    if error is not None:
        raise fail(_describe(error, root))
