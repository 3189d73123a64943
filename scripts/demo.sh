#!/usr/bin/env bash
# The main job on a laptop-class CPU: set up, pretrain a tiny UM-MAE Swin on the bundled
# sample photos (about 2 minutes on 2 cores), and print the reconstruction figure's path.
# --cpu_tuning turns on the optional CPU optimisation (engine/cpu_perf.py); the programs' default is
# plain PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=work_dirs/demo_mae_swin_pico_128
rm -rf "$OUT"
exec .venv/bin/python main_pretrain.py \
  --model mae_swin_pico_128 --mask_regular --vis_mask_ratio 0.25 --norm_pix_loss \
  --batch_size 32 --epochs 25 --warmup_epochs 2 --lr 1e-3 --weight_decay 0.05 \
  --num_workers 2 --print_freq 8 --save_freq 25 --cpu_tuning \
  --output_dir "$OUT" --log_dir "$OUT/tensorboard" "$@"
