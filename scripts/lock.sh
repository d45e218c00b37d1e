#!/usr/bin/env bash
# Refreshes the dependency lock from pyproject.toml: infra/requirements/dev.txt (everything the test
# command installs: runtime, `dev` and `local` extras) and runtime.txt (the image; a subset of the
# same versions). `uv pip compile` resolves for every platform and Python >= 3.11 at once
# (--universal) in about a second; pip installs the result, so users need nothing but pip.
#   ./scripts/lock.sh            keep locked versions where still allowed, add what is new
#   ./scripts/lock.sh --upgrade  move everything to the newest allowed versions
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "uv>=0.9"
compile() { python -m uv pip compile pyproject.toml --universal --python-version 3.11 --quiet "$@"; }
compile --extra dev --extra local -o infra/requirements/dev.txt "$@"
compile -c infra/requirements/dev.txt -o infra/requirements/runtime.txt "$@"
echo "locked: $(grep -c '==' infra/requirements/dev.txt) packages (dev), $(grep -c '==' infra/requirements/runtime.txt) (runtime)"
