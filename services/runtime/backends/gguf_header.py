"""`general.architecture` from a GGUF file's header, for `show` on a llama.cpp host.

llama.cpp's API names no architecture, yet Ollama's `model_info` keys the context length by it
(`<arch>.context_length`). When llama.cpp serves a file this machine can read (the embedded
default), the header says; it is the first key GGUF writers put there, so only a few bytes are read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING = 8
_MAX_KEYS = 64  # the general.* keys come first; past these it is not there
_MAX_STRING = 1 << 16


def architecture(path: str | None) -> str | None:
    """The file's `general.architecture`, or None (no such local file, not GGUF, not found early)."""
    if not path:
        return None
    try:
        with Path(path).open("rb") as f:
            return _read(f)
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None


def _read(f: BinaryIO) -> str | None:
    if f.read(4) != b"GGUF":
        return None
    (version,) = struct.unpack("<I", f.read(4))
    count = "<II" if version == 1 else "<QQ"  # tensor and key counts: 32-bit in version 1 only
    _, keys = struct.unpack(count, f.read(struct.calcsize(count)))
    for _ in range(min(keys, _MAX_KEYS)):
        key = _string(f, version)
        (kind,) = struct.unpack("<I", f.read(4))
        if kind == _STRING:
            value = _string(f, version)
            if key == "general.architecture":
                return value
        elif kind in _SCALARS:
            f.seek(_SCALARS[kind], 1)
        else:  # an array (the tokenizer's): past the general.* keys
            return None
    return None


def _string(f: BinaryIO, version: int) -> str:
    fmt = "<I" if version == 1 else "<Q"
    (length,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    if length > _MAX_STRING:
        raise ValueError("not a GGUF key")
    return f.read(length).decode()
