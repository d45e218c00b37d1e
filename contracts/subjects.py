"""Subject and stream names, and the reversible subject-safe encoding of model names.

`.` separates subject tokens and `*`/`>` are wildcards, so a model name such as `llama3.2:3b` is
percent-encoded (`llama3%2E2:3b`) before it becomes a token. `%` itself is encoded, so decoding
is exact.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

REQUEST_STREAM = "LLM_REQ"
EVENT_STREAM = "LLM_OUT"

REQUEST_SUBJECTS = "llm.req.>"
EVENT_SUBJECTS = "llm.out.>"
GENERATE_PREFIX = "llm.req.generate."
GENERATE_SUBJECTS = "llm.req.generate.>"
EVENT_PREFIX = "llm.out."
CANCEL_PREFIX = "llm.cancel."
CANCEL_SUBJECTS = "llm.cancel.*"

# Names Ollama (and OpenAI-compatible servers) accept: `namespace/name:tag`, at most 200 chars.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:+]{0,199}$")
# Request ids become subject tokens: keep them to a safe alphabet.
REQUEST_ID = re.compile(r"^[A-Za-z0-9_\-]{8,128}$")

_UNSAFE = re.compile(r"[%.*>\s]")


def encode_model(model: str) -> str:
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", model)


def decode_model(token: str) -> str:
    return unquote(token)


def generate_subject(model: str) -> str:
    return GENERATE_PREFIX + encode_model(model)


def model_from_subject(subject: str) -> str:
    return decode_model(subject.rsplit(".", 1)[-1])


def event_subject(request_id: str) -> str:
    return EVENT_PREFIX + request_id


def cancel_subject(request_id: str) -> str:
    return CANCEL_PREFIX + request_id
