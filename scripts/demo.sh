#!/usr/bin/env bash
# README command one: set up .venv, then run the demo (whole pipeline on generated data, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python demo.py "$@"
