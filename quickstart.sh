#!/usr/bin/env bash
# First run on a fresh machine: a local venv with the project (about a minute where the pinned
# torch wheels are on local disk), then `retrieval demo`: index a small real photo gallery,
# serve it over gRPC, query it, stop. Extra arguments go to `retrieval demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/retrieval ]; then
  echo "installing into .venv ..."
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
fi
exec .venv/bin/retrieval demo "$@"
