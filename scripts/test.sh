#!/usr/bin/env bash
# Installs llmbus with its dev tools and the `local` extra (the real llama.cpp model the
# OpenAI-backend tests run against), then runs lint, the type check and the whole test suite.
#   ./scripts/test.sh [pytest args]           the locked versions (infra/requirements/dev.txt)
#   ./scripts/test.sh --newest [pytest args]  the newest versions pyproject.toml allows: finds the
#                                             release that breaks llmbus before a user does
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
if [[ "${1:-}" == "--newest" ]]; then
  shift
  pip_install --upgrade --upgrade-strategy eager -e '.[dev,local]'
else
  pip_install -r infra/requirements/dev.txt
  pip_install --no-deps -e .
fi
python -m pip check --disable-pip-version-check >/dev/null || { python -m pip check; exit 1; }
# The demo page's browser test drives Debian's chromium (Playwright cannot download browsers here).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "could not install chromium: tests/test_demo_page.py will be skipped" >&2
fi
# tests/node's packages: the official AsyncAPI parser, which checks contracts/asyncapi.yaml
# (tests/test_asyncapi.py), and the official JavaScript clients `openai` and `ollama`
# (tests/test_js_clients.py). Installed from tests/node's lock into tests/node/node_modules
# (gitignored) when Node is here and a package is missing or the lock changed since the install.
node_packages_stale() {
  [[ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]] ||
    ! (cd tests/node && node -e '
      const fs = require("fs");
      const wanted = Object.keys(require("./package.json").dependencies);
      process.exit(wanted.every((name) => fs.existsSync(`node_modules/${name}/package.json`)) ? 0 : 1);')
}
if command -v npm >/dev/null 2>&1 && node_packages_stale; then
  (cd tests/node && npm ci --silent --no-audit --no-fund) ||
    echo "could not install tests/node's packages: the tests that run them with Node will be skipped" >&2
fi
python -m ruff check .
python -m ruff format --check .
python -m mypy
# Each test has its own limit (pyproject.toml); the run as a whole has this one, so nothing stuck
# can hold CI until its own limit: past it the run fails loudly, naming the limit.
limit="${TEST_TIME_LIMIT_S:-1800}"
status=0
timeout --kill-after=30 "$limit" python -m pytest "$@" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "test run stopped: it took longer than ${limit}s (TEST_TIME_LIMIT_S)" >&2
fi
exit $status
