#!/usr/bin/env bash
# Install steps of the CPU image (deploy/Dockerfile.cpu runs exactly this script), usable
# outside docker too:   VENV=/tmp/cpuimg/venv bash deploy/build_cpu.sh
#
# 1. scripts/install.sh (the same steps as `make install`): a CPU build of torch pinned with
#    a constraint file, DeepSpeed without compiled ops, the project (editable) with EXTRAS.
# 2. Ray and DeepSpeed are then pinned to RAY_VERSION / DEEPSPEED_VERSION (the versions the
#    CUDA image deploy/Dockerfile pins), still under the torch constraint.
# VENV may be relative; it is resolved against the current folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-/opt/venv}"
case "$VENV" in
  /*) ;;
  *) VENV="$PWD/$VENV" ;;
esac
export VENV
export PYTHON="${PYTHON:-python3}"
export EXTRAS="${EXTRAS:-dev,lora}"
RAY_VERSION="${RAY_VERSION:-2.60.0}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
# No GPU is expected here: make DeepSpeed pick its CPU accelerator at import time.
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

echo "[build_cpu] python=$PYTHON venv=$VENV extras=$EXTRAS ray=$RAY_VERSION deepspeed=$DEEPSPEED_VERSION"
bash "$ROOT/scripts/install.sh"
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip --disable-pip-version-check -q install \
  --no-build-isolation -c "$VENV/constraints.txt" \
  "ray[default]==$RAY_VERSION" "deepspeed==$DEEPSPEED_VERSION"
"$VENV/bin/python" -c "import embr_rl.pretrain, embr_rl.run, embr_rl.plan, ray, deepspeed, torch; print(f'[build_cpu] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
