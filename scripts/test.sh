#!/usr/bin/env bash
# Sets up .venv, builds the docs site (strict) and runs the test suite (slow and GPU tests are skipped; add `-m slow` to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# the documentation site: a broken link, a missing page or a missing reference fails here (mkdocs.yml)
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -f mkdocs.yml -d "$site"
rm -rf "$site"
exec .venv/bin/python -m pytest -q "$@"
