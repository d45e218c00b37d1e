#!/usr/bin/env bash
# Installs llmbus with its dev tools, then runs lint, the type check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
