#!/usr/bin/env bash
# Sets up .venv and runs the test suite (slow and GPU tests are skipped; add `-m slow` to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
