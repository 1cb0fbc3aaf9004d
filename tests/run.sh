#!/usr/bin/env bash
# The test command: sets up the cached virtualenv, then runs the suite offline, without the tests marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/venv.sh
export HF_HUB_OFFLINE=1
exec python -m pytest -q -p no:cacheprovider -m "not slow" tests "$@"  # -m '' also runs the slow tests
