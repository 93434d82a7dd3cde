#!/usr/bin/env bash
# Create .venv at the repository root (when missing) and install the project into it.
#
# torch goes in first and is then pinned with a constraint file, so that no later
# package (deepspeed, ray, transformers, ...) can replace it with another build:
#   - CPU host (no working nvidia-smi): the +cpu build, from wherever pip's own
#     configuration finds it (find-links, an index in pip.conf or PIP_INDEX_URL). Set
#     TORCH_INDEX_URL to add an index that serves CPU builds (no default: this script names
#     no package index).
#   - GPU host: the default (CUDA) build of the same version, from pip's configured index.
# DeepSpeed is installed with DS_BUILD_OPS=0 and without build isolation (its build
# imports torch); its ops are compiled on first use on GPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if have_gpu; then
    echo "[install] GPU host: torch==$TORCH_VERSION (CUDA build)"
    "${pip[@]}" install "torch==$TORCH_VERSION" numpy
  else
    echo "[install] CPU host: torch==$TORCH_VERSION (CPU build)"
    extra=()
    [ -n "$TORCH_INDEX_URL" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")
    if ! "${pip[@]}" install "torch==$TORCH_VERSION+cpu" numpy "${extra[@]}"; then
      echo "[install] no torch==$TORCH_VERSION+cpu where pip looks; set TORCH_INDEX_URL to an" \
        "index that serves CPU builds, or put the wheel in pip's find-links" >&2
      exit 1
    fi
  fi
fi

# Pin whatever torch build is now installed.
"$VENV/bin/python" - > "$VENV/constraints.txt" <<'PYEOF'
import torch
print(f"torch=={torch.__version__}")
PYEOF
if ! have_gpu && "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "[install] warning: a CUDA build of torch is installed on a host without a GPU" >&2
fi

if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  echo "[install] deepspeed (DS_BUILD_OPS=0, no build isolation)"
  DS_BUILD_OPS=0 "${pip[@]}" install -c "$VENV/constraints.txt" numpy setuptools wheel
  DS_BUILD_OPS=0 "${pip[@]}" install --no-build-isolation -c "$VENV/constraints.txt" deepspeed
fi

echo "[install] embr-rl[$EXTRAS] (editable)"
DS_BUILD_OPS=0 "${pip[@]}" install --no-build-isolation -c "$VENV/constraints.txt" -e ".[$EXTRAS]"
have_gpu || export DS_ACCELERATOR=cpu
"$VENV/bin/python" -c "import embr_rl, actors, learner, buffer, torch, deepspeed, ray; print(f'[install] ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}')"
