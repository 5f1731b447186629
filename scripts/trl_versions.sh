#!/usr/bin/env bash
# The TRL bridge's tests under each supported TRL release, one virtual environment per release.
#
#   bash scripts/trl_versions.sh [VERSION ...]        # default: the supported releases, 1.14.2 1.16.0
#
# Each release gets its own venv, $VENVS/trl-<version> (made once, then reused; delete it to rebuild), with torch,
# this checkout (pip install -e .), that TRL release, pytest, datasets and peft; then tests/test_trl_bridge.py
# and tests/test_flow_learner.py run in it and a table of passed / failed / error / skipped tests is printed
# (under a release outside rlfr.integrations.trl.TRL_VERSIONS the bridge's tests fail to import). The venvs
# never see another environment's packages (no --system-site-packages), so each runs the TRL it names.
# Settings (environment): VENVS (default .venvs, inside this checkout), PYTHON (default python3), TORCH (default torch==2.13.0),
# TRANSFORMERS (e.g. transformers==5.25.0 to pin it; default: whatever pip resolves). Logs: $VENVS/trl-<v>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(1.14.2 1.16.0)
VENVS=${VENVS:-.venvs}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TRANSFORMERS=${TRANSFORMERS:-}
mkdir -p "$VENVS"

rows=()
for v in "${VERSIONS[@]}"; do
  venv="$VENVS/trl-$v" log="$VENVS/trl-$v.log"
  : >"$log"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '$v')" 2>/dev/null; then
    echo "building $venv (log: $log)"
    rm -rf "$venv"
    if ! { "$PYTHON" -m venv "$venv" &&
      "$venv/bin/pip" install -q "$TORCH" &&
      "$venv/bin/pip" install -q -e . "trl==$v" $TRANSFORMERS pytest datasets peft; } >>"$log" 2>&1; then
      rows+=("| $v | - | - | - | - | install failed (see $log) |")
      continue
    fi
  fi
  echo "testing trl $v"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_trl_bridge.py tests/test_flow_learner.py >>"$log" 2>&1
  summary=$(grep -E "^=* ?[0-9]+ (passed|failed|skipped|errors?)\b" "$log" | tail -1)
  count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE "[0-9]+" || echo 0; }
  versions=$("$venv/bin/python" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')")
  rows+=("| $v | $(count passed) | $(count failed) | $(count error) | $(count skipped) | $versions |")
done

echo
echo "| trl | passed | failed | errors | skipped | with |"
echo "|---|--:|--:|--:|--:|---|"
printf '%s\n' "${rows[@]}"
