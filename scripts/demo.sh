#!/usr/bin/env bash
# Set-up, then the demo: a keepalived pair fails over in a closed lab and the HAVIP follows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
