"""`python -m scripts.bench.profile DIR`: where each gateway process spends its time, from the
collapsed stacks `python -m scripts.bench --profile DIR` recorded (py-spy, one file per process).

Each sample is put in the first bucket whose marker frame it contains (order matters: a token's
write to the client is inside the HTTP request's frames too); the rest is listed by its leaf.
Threads parked in a pool and the event loop waiting in `select` are reported, not hidden.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

# (bucket, markers): the first bucket any of whose markers is in a sample's stack gets the sample.
BUCKETS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "edge": [
        ("idle: thread pool", ("concurrent/futures/thread.py",)),
        (
            "per token: relay to the client",
            ("ASGIStreamingResponse._stream", "relay (services/edge/serve.py"),
        ),
        ("per token: NATS read and dispatch", ("Client._read_loop", "Subscription._wait_for_msgs")),
        ("NATS writes (flusher)", ("Client._flusher",)),
        ("per request: submit (admission, publish, accepted record)", ("Dispatcher.submit",)),
        ("per request: HTTP, routing, middleware", ("run_asgi", "HttpToolsProtocol", "data_received")),
    ],
    "generator": [
        ("idle: thread pool", ("concurrent/futures/thread.py",)),
        ("per token: upstream read, parse, publish", ("Job.token", "_ndjson", "Response.body")),
        ("NATS writes (flusher)", ("Client._flusher",)),
        ("per request: terminal event, usage, ack", ("Job.done", "Job.emit", "Job.fail")),
        ("per request: upstream call", ("Generate._open", "StreamingClient.post")),
        ("per request: fetch and the rest of the job", ("Worker._slot", "Worker._process")),
        ("NATS read", ("Client._read_loop",)),
    ],
}
LOOP_WAIT = "Runner.run (asyncio/runners.py:118)"


def summarise(path: Path, buckets: list[tuple[str, tuple[str, ...]]], top: int = 8) -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        for name, markers in buckets:
            if any(marker in stack for marker in markers):
                counts[name] += samples
                break
        else:
            leaf = stack.split(";")[-1]
            counts["idle: event loop waiting" if leaf == LOOP_WAIT else f"other: {leaf[:70]}"] += samples
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.stem}: {total} samples"]
    named = [(k, v) for k, v in counts.items() if not k.startswith("other: ")]
    others = sorted(((k, v) for k, v in counts.items() if k.startswith("other: ")), key=lambda kv: -kv[1])
    for name, samples in sorted(named, key=lambda kv: -kv[1]) + others[:top]:
        lines.append(f"  {100 * samples / total:5.1f}%  {name}")
    rest = sum(v for _, v in others[top:])
    if rest:
        lines.append(f"  {100 * rest / total:5.1f}%  other (smaller)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.profile", description=__doc__)
    p.add_argument("dir", type=Path, help="the --profile directory of a `python -m scripts.bench` run")
    args = p.parse_args(argv)
    for path in sorted(args.dir.glob("*.txt")):
        role = path.stem.partition("-")[0]
        print("\n".join(summarise(path, BUCKETS.get(role, []))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
