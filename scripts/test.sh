#!/usr/bin/env bash
# Set-up, then the whole check: lint, types, and every test (unit, integration, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy" && .venv/bin/mypy .
echo "== import rules" && .venv/bin/lint-imports
echo "== pytest"
status=0
.venv/bin/pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" = 5 ]; then
    echo "pytest collected no test: that is a failure here" >&2
    exit 1
fi
exit "$status"
