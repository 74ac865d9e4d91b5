#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements into it.
# Idempotent: a second run with unchanged requirements returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha1
want=$(cat requirements.txt requirements-base.txt | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements (first time: about 3-4 minutes, ~6.5 GB)"
  # -qq: only errors (a pip config may add a warning per package about absent mirrors)
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -r requirements.txt
  echo "$want" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"
