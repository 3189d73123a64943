"""A small end-to-end experiment anyone can rerun offline (FINETUNE.md).

scikit-learn's 8x8 handwritten digits (1,797 real scans, 10 classes), upsampled to 64 px:
  1. pretrain a tiny UM-MAE Swin on the training images WITHOUT labels;
  2. finetune it on the labels, and train the same classifier from scratch with the same
     finetuning budget; 3 seeds each;
  3. print mean +- std top-1 on the held-out images and write JSON.

    python tools/digits_experiment.py --out work_dirs/digits  [--pretrain_epochs 40 --finetune_epochs 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_finetune  # noqa: E402
import main_pretrain  # noqa: E402


def write_digits(root: Path, size: int = 64, val_fraction: float = 0.3, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_val = int(len(order) * val_fraction)
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        img = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        folder = root / split / f"digit_{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def best_acc(out: Path) -> float:
    return max(json.loads(l)["test_acc1"] for l in (out / "log.txt").read_text().splitlines())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="work_dirs/digits")
    p.add_argument("--pretrain_epochs", type=int, default=40)
    p.add_argument("--finetune_epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num_workers", type=int, default=2)
    a = p.parse_args()
    out = Path(a.out)
    data = write_digits(out / "data")
    common = ["--device", "cpu", "--num_workers", str(a.num_workers), "--print_freq", "1000", "--log_dir", "",
              "--no_auto_resume"]
    t0 = time.time()
    pre_dir = out / "pretrain"
    main_pretrain.main(main_pretrain.parse_args(common + [
        "--model", "mae_swin_pico_128", "--input_size", "64", "--mask_regular", "--vis_mask_ratio", "0.25",
        "--norm_pix_loss", "--data_path", str(data), "--batch_size", "64", "--epochs", str(a.pretrain_epochs),
        "--warmup_epochs", "2", "--blr", "1.5e-3", "--output_dir", str(pre_dir), "--save_freq", "1000"]))
    pretrain_s = time.time() - t0
    results: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    for seed in a.seeds:
        for arm in results:
            ft_dir = out / f"{arm}_seed{seed}"
            argv = common + ["--model", "swin_pico_128", "--input_size", "64", "--nb_classes", "10",
                             "--data_path", str(data), "--batch_size", "64", "--epochs", str(a.finetune_epochs),
                             "--warmup_epochs", "2", "--blr", "2e-3", "--layer_decay", "0.75", "--weight_decay",
                             "0.05", "--drop_path", "0.1", "--aa", "none", "--reprob", "0", "--smoothing", "0.1",
                             "--seed", str(seed), "--output_dir", str(ft_dir), "--save_freq", "1000"]
            if arm == "pretrained":
                argv += ["--finetune", str(pre_dir / f"checkpoint-{a.pretrain_epochs - 1}.pth")]
            main_finetune.main(main_finetune.parse_args(argv))
            results[arm].append(best_acc(ft_dir))
    summary = {arm: {"top1": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
               for arm, accs in results.items()}
    summary["setup"] = {"pretrain_epochs": a.pretrain_epochs, "finetune_epochs": a.finetune_epochs,
                        "seeds": a.seeds, "pretrain_seconds": round(pretrain_s, 1),
                        "total_seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    for arm in results:
        s = summary[arm]
        print(f"{arm:>10}: top-1 {s['mean']:.2f} +- {s['std']:.2f}  ({', '.join(f'{x:.2f}' for x in s['top1'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
