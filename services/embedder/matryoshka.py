"""Embeddings of the size asked for (`dimensions`), whatever the backend does with the parameter.

A backend that honours `dimensions` (Ollama, OpenAI) answers that size. One that ignores it
(llama.cpp, an older Ollama) answers its full size: for a model documented as Matryoshka-trained
(its leading dimensions are an embedding on their own) the vectors are cut to the size asked and
re-normalised to unit length; for any other model, or a size above the model's, the request fails
with `unsupported`. Vectors never have another length than asked.
"""

from __future__ import annotations

import math
import re
from array import array

from services.runtime.backends.base import unsupported

# Base names (no registry path, no tag; lower case, `_`/`.` as `-`) of the model families whose
# cards document Matryoshka training. nomic-embed-text v1 (not v1.5) is not among them.
MATRYOSHKA = (
    "nomic-embed-text",  # v1.5 (Ollama's `nomic-embed-text`) and v2-moe: 768 -> 512, 256, 128, 64
    "mxbai-embed-large",  # mixedbread's v1: 1024 -> 512 and below
    "embeddinggemma",  # 768 -> 512, 256, 128
    "qwen3-embedding",  # any size from 32 up
    "snowflake-arctic-embed2",  # arctic-embed-l v2.0: 1024 -> 256
    "snowflake-arctic-embed-l-v2-0",
    "snowflake-arctic-embed-m-v2-0",
    "text-embedding-3",  # OpenAI's, should a server answer them in full
)
_NOT = re.compile(r"nomic-embed-text-v1(?!-5)")  # v1 itself


def base_name(model: str) -> str:
    base = model.lower().rsplit("/", 1)[-1].split(":", 1)[0]
    return re.sub(r"[._]", "-", base).removesuffix("-gguf")


def is_matryoshka(model: str) -> bool:
    base = base_name(model)
    return base.startswith(MATRYOSHKA) and not _NOT.match(base)


def fit(model: str, vectors: list[array[float]], dimensions: int) -> list[array[float]]:
    """`vectors` at `dimensions` each, or `LlmbusError(unsupported)`."""
    wrong = next((len(v) for v in vectors if len(v) != dimensions), None)
    if wrong is None:
        return vectors
    if wrong < dimensions:
        raise unsupported(
            "dimensions", f"model {model!r} answers {wrong}-dimensional vectors, fewer than asked"
        )
    if not is_matryoshka(model):
        why = f"model {model!r} answers {wrong}-dimensional vectors here and is not Matryoshka-trained"
        raise unsupported("dimensions", why + ", so they cannot be shortened")
    return [_cut(v, dimensions) for v in vectors]


def _cut(vector: array[float], dimensions: int) -> array[float]:
    head = vector[:dimensions]
    norm = math.sqrt(math.fsum(x * x for x in head))
    return array("f", (x / norm for x in head)) if norm else head
