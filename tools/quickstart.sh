#!/usr/bin/env bash
# One-command set-up for a fresh machine.
#   bash tools/quickstart.sh test   -> install everything, then run the test suite
#   bash tools/quickstart.sh demo   -> install everything, then run the embedded distillation demo
# Installs only what is missing: a venv in .venv, the package with its dev extra, and
# (where apt exists and we may use it) Debian's Fashion-MNIST data package.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true
VENV="${TSM_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Let pip resolve torch and torchvision as a matching pair; no exact pins.
# (Re)install when the venv lacks the package or pyproject.toml changed since the last install.
stamp="$VENV/.tsm_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c "import tsm_core, pytest" >/dev/null 2>&1; then
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq || true
    $SUDO apt-get install -y -qq dataset-fashion-mnist || echo "note: could not install dataset-fashion-mnist"
  fi
fi

case "$what" in
  # The import layers first (pyproject.toml [tool.importlinter]; docs/architecture.md): seconds, and a
  # broken layer is a design error worth seeing before the tests.
  test) "$VENV/bin/lint-imports" --no-cache && exec "$PY" -m pytest tests "$@" ;;
  demo) exec "$VENV/bin/tsm-demo" "$@" ;;
  *) echo "usage: bash tools/quickstart.sh {test|demo} [extra args]" >&2; exit 2 ;;
esac
