#!/usr/bin/env bash
# Create .venv and install the pinned requirements (torch and torchvision pinned exactly,
# so no other package can pull in a different torch build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# animal-mnist ships real 28x28 images (the pretraining experiment's data). Its wheel declares
# tensorflow, which it needs only for other data sets: install it alone, without dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps animal-mnist==0.4
.venv/bin/python - <<'PY'
import torch, torchvision, timm
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
PY
