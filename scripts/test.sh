#!/usr/bin/env bash
# Sets up (scripts/setup.sh, including what the headless-browser test needs: Debian's
# chromium, node/npm and playwright-core) and runs the whole test suite. CI runs this.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k data`.
set -euo pipefail
cd "$(dirname "$0")/.."
export ILM_BROWSER_TESTS=${ILM_BROWSER_TESTS:-1}
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
