#!/usr/bin/env bash
# Set up nvmpriv in .venv and run one job: `demo` (quickstart training) or `test` (the test suite).
#
# Environment knobs:
#   PYTHON       interpreter used to create the venv (default: python3.11, else python3)
#   VENV         venv folder (default: .venv)
#   TORCH_SPEC   the torch/torchvision pair installed first (default below; loads on CPU and CUDA)
#   TORCH_INDEX  optional extra index for another torch build, e.g. a CPU-only or CUDA-specific one
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
shift || true
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch===2.13.0 torchvision==0.28.0}"

setup() {
  local stamp="$VENV/.nvmpriv-installed"
  local want
  want="$(cat pyproject.toml; echo "$TORCH_SPEC ${TORCH_INDEX:-}")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  # shellcheck disable=SC2086
  if [ -n "${TORCH_INDEX:-}" ]; then
    "${pip[@]}" --extra-index-url "$TORCH_INDEX" $TORCH_SPEC
  else
    "${pip[@]}" $TORCH_SPEC
  fi
  # Pin whatever torch/torchvision just got installed so no dependency can replace them.
  "$VENV/bin/python" - > "$VENV/torch-constraints.txt" <<'PY'
from importlib.metadata import version
for name in ("torch", "torchvision"):
    try:
        print(f"{name}==={version(name)}")
    except Exception:
        pass
PY
  "${pip[@]}" -c "$VENV/torch-constraints.txt" -e ".[vision,dev]"
  printf '%s' "$want" > "$stamp"
}

case "$job" in
  setup)
    setup
    ;;
  demo)
    setup
    exec "$VENV/bin/python" -m nvmpriv fit --config lightning_configs/quickstart.yaml "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  lint)
    setup
    "$VENV/bin/ruff" check nvmpriv tests benchmarks scripts
    "$VENV/bin/ruff" format --check nvmpriv tests benchmarks scripts
    "$VENV/bin/mypy"
    "$VENV/bin/lint-imports"
    ;;
  *)
    echo "usage: scripts/dev.sh {setup|demo|test|lint} [extra args]" >&2
    exit 2
    ;;
esac
