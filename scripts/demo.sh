#!/usr/bin/env bash
# Sets up .venv and runs the main job: `rlfr demo` on the embedded model and task.
# Extra arguments go to `rlfr demo` (e.g. quick=true out=DIR seed=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlfr demo "$@"
