#!/usr/bin/env bash
# The test command: sets up the cached virtualenv, then runs the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/venv.sh
export HF_HUB_OFFLINE=1
exec python -m pytest -q -p no:cacheprovider tests "$@"
