#!/usr/bin/env bash
# One-shot check of this repository on one CUDA GPU: versions, correctness, then speed, in at most
# 7 minutes; prints the versions first and a table last, and writes gpu_check.json (and the
# benchmark's JSON files) into --out (default: $OUT, else ./gpu_check_out). PRETRAIN.md, "First run
# on a GPU", says how to read it.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run       # anywhere: the parts that need no CUDA, and the plan
#   bash scripts/gpu_check.sh --only speed    # one part (and the versions)
#   bash scripts/gpu_check.sh --fetch-wheels  # on a machine with a package registry: fill .whl/
#
# Python: $PYTHON when set; else .venv/bin/python when its torch sees a GPU (or for --dry-run);
# else the machine's own python3. The code runs on torch >= 2.11 / torchvision >= 0.26 with timm and
# tensorboard, so a GPU machine's own Python works without the pinned environment, given the wheels
# of the packages it lacks. For a machine that reaches no package registry, fill the git-ignored
# .whl/ folder on one that does (the wheels are for CPython 3.12 on x86-64 Linux; for another Python
# change --python-version / --abi):
#
#   python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#       --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .whl simplejpeg==1.9.0 submitit==1.5.4 pycocotools==2.0.11 \
#       webdataset==1.0.2 braceexpand==0.1.7 cloudpickle pyyaml
#
# (that is what --fetch-wheels runs) and carry .whl/ with the working tree. tools/gpu_check.py unpacks
# each carried wheel whose module the Python lacks into .whl/site (no pip, no index) and puts that
# folder on PYTHONPATH for itself and the programs it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  exec "${PYTHON:-python3}" -m pip download --only-binary=:all: --no-deps --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .whl simplejpeg==1.9.0 submitit==1.5.4 pycocotools==2.0.11 \
    webdataset==1.0.2 braceexpand==0.1.7 cloudpickle pyyaml
fi

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && { [ $dry = 1 ] || .venv/bin/python -c \
    "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
  PY=.venv/bin/python
else
  PY=python3
fi
echo "python: $PY"
# 7 minutes in all: the parts share a 400 s budget (a part that would not fit is skipped), and a
# part that hangs is stopped here
exec timeout --kill-after=10 420 "$PY" tools/gpu_check.py "$@"
