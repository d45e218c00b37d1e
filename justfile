# Developer and operator recipes. `just --list` shows them all.

# Run the whole local stack: embedded NATS, every service, the edge.
up:
    pip install -e . && llmbus up

# Install dev tools and run lint, type check and the whole test suite.
test *ARGS:
    ./scripts/test.sh {{ARGS}}

lint:
    ruff check .
    ruff format --check .
    mypy

fmt:
    ruff check --fix .
    ruff format .

# Measure what the gateway adds to each request (see docs/benchmarks.md).
bench *ARGS:
    python scripts/bench.py {{ARGS}}

# Re-export contracts/schemas/*.json and contracts/asyncapi.yaml from the message types.
contracts:
    llmbus contracts

compose-up:
    docker compose up -d --build

compose-down:
    docker compose down

logs *SERVICES:
    docker compose logs -f {{SERVICES}}

# Where to look at traces (Jaeger from compose.yml).
traces:
    @echo "Jaeger UI: http://localhost:16686"
