"""Modelfile text to the structured `/api/create` body, as the `ollama create` CLI does.

Ollama 0.5.5 and later no longer read Modelfiles on the server: the client parses them and sends
`from`, `system`, `template`, `parameters`, ...; a `FROM` that names a local GGUF file is uploaded
as a blob first (`OllamaAdmin.create` does that). `ADAPTER` is not supported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from contracts import ErrorCode, LlmbusError
from services.runtime.backends.ollama_admin import CreateSpec

_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)\s+(.*)$", re.DOTALL)
_LIST_PARAMETERS = frozenset({"stop"})
_INT = re.compile(r"^-?\d+$")
_FLOAT = re.compile(r"^-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


def _bad(line_no: int, message: str) -> LlmbusError:
    return LlmbusError(ErrorCode.BAD_REQUEST, f"Modelfile line {line_no}: {message}")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Joins `\"\"\"`-quoted values that span lines; drops comments and blank lines."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, start = lines[i], i + 1
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.count('"""') == 1:  # a triple-quoted value opens here and closes later
            parts = [line]
            while i < len(lines):
                parts.append(lines[i])
                i += 1
                if '"""' in parts[-1]:
                    break
            else:
                raise _bad(start, 'unterminated """')
            line = "\n".join(parts)
        out.append((start, line))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    for quote in ('"""', '"'):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value


def _typed(value: str) -> Any:
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _is_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.lower().endswith((".gguf", ".bin"))


def parse(text: str, base_dir: Path | None = None) -> CreateSpec:
    """Raises `LlmbusError(bad_request)` naming the line of anything it cannot use."""
    spec = CreateSpec()
    parameters: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    for line_no, line in _logical_lines(text):
        match = _INSTRUCTION.match(line)
        if match is None:
            raise _bad(line_no, f"expected an instruction and a value, got {line.strip()[:60]!r}")
        command, rest = match.group(1).upper(), match.group(2).strip()
        if command == "FROM":
            value = _unquote(rest)
            if _is_path(value):
                path = Path(value).expanduser()
                path = path if path.is_absolute() or base_dir is None else base_dir / path
                if not path.is_file():
                    raise _bad(line_no, f"FROM file {path} does not exist where the janitor runs")
                spec.from_file = str(path)
            else:
                spec.from_ = value
        elif command in ("SYSTEM", "TEMPLATE", "LICENSE"):
            setattr(spec, command.lower(), _unquote(rest))
        elif command == "PARAMETER":
            key, _, value = rest.partition(" ")
            if not value.strip():
                raise _bad(line_no, f"PARAMETER {key} needs a value")
            typed = _typed(_unquote(value))
            if key in _LIST_PARAMETERS:
                parameters.setdefault(key, []).append(str(typed))
            else:
                parameters[key] = typed
        elif command == "MESSAGE":
            role, _, content = rest.partition(" ")
            if role not in ("system", "user", "assistant"):
                raise _bad(line_no, f"MESSAGE role must be system, user or assistant, not {role!r}")
            messages.append({"role": role, "content": _unquote(content)})
        elif command == "ADAPTER":
            raise _bad(line_no, "ADAPTER is not supported; merge the adapter into the GGUF")
        else:
            raise _bad(line_no, f"unknown instruction {command}")
    if not spec.from_ and spec.from_file is None:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "Modelfile has no FROM line")
    spec.parameters = parameters or None
    spec.messages = messages or None
    return spec
