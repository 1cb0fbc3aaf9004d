#!/usr/bin/env bash
# The test command: sets up the cached virtualenv, then runs the suite offline, without the tests marked slow.
# `bash tests/run.sh -m ''` also runs the slow tests; `bash tests/run.sh tests/test_x.py` runs one file.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/venv.sh
export HF_HUB_OFFLINE=1
targets=(tests)
for arg in "$@"; do
  case "$arg" in tests/*) targets=() ;; esac  # a file or test named: run that, not the whole folder
done
exec python -m pytest -q -p no:cacheprovider -m "not slow" "${targets[@]}" "$@"
