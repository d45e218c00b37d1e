# Developer and operator recipes. `just --list` shows them all.

# Run the whole local stack: embedded NATS, every service, the edge.
up:
    pip install -e '.[local]' && llmbus up

# Install dev tools and run lint, type check and the whole test suite.
test *ARGS:
    ./scripts/test.sh {{ARGS}}

# The same suite on the newest versions pyproject.toml allows (not the lock), in a fresh virtualenv:
# finds the release that breaks llmbus before a user does.
test-newest *ARGS:
    rm -rf .venv-newest && python3 -m venv .venv-newest
    . .venv-newest/bin/activate && ./scripts/test.sh --newest {{ARGS}}

# Refresh the dependency lock (infra/requirements/*.txt); `just lock --upgrade` moves to the newest.
lock *ARGS:
    ./scripts/lock.sh {{ARGS}}

lint:
    ruff check .
    ruff format --check .
    mypy

fmt:
    ruff check --fix .
    ruff format .

# Retake README's demo-page picture (docs/img/demo.png) from the browser test.
screenshot:
    LLMBUS_UPDATE_SCREENSHOT=1 python -m pytest tests/test_demo_page.py -k cancels_one_upstream

# Measure what the gateway adds to each request, next to direct calls and LiteLLM (docs/benchmarks.md).
bench *ARGS:
    python -m scripts.bench {{ARGS}}

# What one bus hop costs on this machine: sockets, nats-server, nats-py, JetStream (docs/benchmarks.md).
bench-floor *ARGS:
    python -m scripts.bench.floor {{ARGS}}

# What tracing costs: the same requests with tracing off and exported to a real OTLP receiver.
bench-tracing *ARGS:
    python scripts/bench_tracing.py {{ARGS}}

# Tokens/s and time to first token through llmbus vs straight to the embedded llama.cpp (docs/benchmarks.md).
bench-local *ARGS:
    python scripts/bench_local.py {{ARGS}}

# Embedding throughput with micro-batching on and off, and cache-hit latency (docs/benchmarks.md).
bench-embed *ARGS:
    python scripts/bench_embed.py {{ARGS}}

# Routing accuracy on tests/data/routing.jsonl and the time the routing hop adds (docs/benchmarks.md).
bench-routing *ARGS:
    python scripts/bench_routing.py {{ARGS}}

# Fault tests with real processes, and the long chaos run (docs/reliability.md).
faults *ARGS:
    python -m pytest tests/test_faults.py -s {{ARGS}}

chaos:
    python -m pytest tests/test_faults.py -s -m slow

# Re-export contracts/schemas/*.json and contracts/asyncapi.yaml from the message types.
contracts:
    llmbus contracts

compose-up:
    docker compose up -d --build

compose-down:
    docker compose down

logs *SERVICES:
    docker compose logs -f {{SERVICES}}

# Where traces go, as this shell's OTEL_* variables configure them (compose.yml: Jaeger).
traces:
    @python -m services.runtime.tracing
