"""`python -m services.healthcheck`: the image's HEALTHCHECK, whichever service the container runs.

Healthy (exit 0) when this container's service answers on loopback: the edge's `/health/live` on
`LLMBUS_HTTP_PORT`, or a worker's or the janitor's `/metrics` on its role port (LLMBUS_METRICS_PORT
+ offset, or the spill range after them). Only one service runs in a container, so any answer is its.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from services.runtime.metrics import PORT_RANGE


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    urls = [f"http://127.0.0.1:{os.environ.get('LLMBUS_HTTP_PORT', '8080')}/health/live"]
    base = int(os.environ.get("LLMBUS_METRICS_PORT", "0") or 0)
    if base:
        urls += [f"http://127.0.0.1:{port}/metrics" for port in range(base, base + PORT_RANGE)]
    return 0 if any(_answers(url) for url in urls) else 1


if __name__ == "__main__":
    sys.exit(main())
