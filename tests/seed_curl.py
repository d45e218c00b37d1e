"""A seed's documented curl command, replayed verbatim against the edge (only the host changes)."""

from __future__ import annotations

import re
import shlex

import httpx


def request(command: str, edge_url: str) -> httpx.Request:
    """The httpx request `command` (a `curl ...` line, backslash continuations allowed) makes."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "curl", command
    method, body, headers, url = None, None, {}, None
    it = iter(words[1:])
    for word in it:
        if word == "-X":
            method = next(it)
        elif word == "-H":
            name, value = next(it).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word == "-d":
            body = next(it)
        elif word in ("-N", "--no-buffer", "-s"):
            pass
        else:
            url = re.sub(r"^https?://[^/]+", edge_url, word)
    assert url is not None, command
    method = method or ("POST" if body is not None else "GET")
    return httpx.Request(method, url, headers=headers, content=body.encode() if body is not None else None)
