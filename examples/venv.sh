# Source this file: it creates (once) and activates the project's virtualenv, cached outside the clone.
# The cache key is a hash of requirements.txt, so a change of requirements builds a fresh environment.
# Override the location with CAT_LORA_VENV=/path/to/venv.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: python3 >= 3.10 is required (found: $(python3 --version 2>&1))" >&2
  return 1 2>/dev/null || exit 1
fi
_key="$(sha256sum "$_root/requirements.txt" | cut -c1-12)"
CAT_LORA_VENV="${CAT_LORA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cat-lora/venv-$_key}"
if [ ! -f "$CAT_LORA_VENV/.complete" ]; then
  # One installer at a time: two clones (or two jobs) set up at once would delete each other's half-built venv.
  mkdir -p "$(dirname "$CAT_LORA_VENV")"
  exec 9>"$CAT_LORA_VENV.lock"
  flock 9
  if [ ! -f "$CAT_LORA_VENV/.complete" ]; then
    echo "Setting up the virtualenv in $CAT_LORA_VENV (first run only: a few minutes, several GB for torch)" >&2
    rm -rf "$CAT_LORA_VENV"
    python3 -m venv "$CAT_LORA_VENV" &&
      "$CAT_LORA_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$_root/requirements.txt" &&
      touch "$CAT_LORA_VENV/.complete" || { echo "error: installing requirements.txt failed" >&2; flock -u 9; return 1 2>/dev/null || exit 1; }
  fi
  flock -u 9
  exec 9>&-
fi
export PATH="$CAT_LORA_VENV/bin:$PATH"
# The clone's own modules for `python benchmarks/x.py` and `python examples/...`: train_cat_lora and evaluate_kps
# (root) and tiny_pipeline (examples). A path, not `pip install -e .`: the virtualenv is shared by every clone with
# the same requirements.txt, and an editable install would point all of them at whichever clone installed last.
export PYTHONPATH="$_root:$_root/examples${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_TELEMETRY=1
unset _root _key
