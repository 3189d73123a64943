"""Linear probe on frozen features with two optimizers, side by side (FINETUNE.md, "Linear probe").

Extracts the frozen pooled features of a classifier (random init, or ``--finetune`` weights) once,
then trains MAE's probe head (BatchNorm without affine + Linear, head init trunc-normal 0.01) with
MAE's schedule (per-step warmup + cosine, lr = blr x batch / 256) using
  * ``timm``: ``timm.optim.Lars(params, lr, weight_decay)`` with timm's defaults (what the probe used
    before: momentum 0, no trust ratio without weight decay = plain SGD);
  * ``mae``: engine.lars.LARS (momentum 0.9, trust coefficient 0.001, 1-D tensors excluded).

    python tools/probe_optimizers.py --data_path DIR --model swin_pico_128 --input_size 64 [--finetune CKPT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from engine.lars import LARS  # noqa: E402
from engine.schedule import lr_at  # noqa: E402


def features(model, path: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets
    from imagedata.datasets import eval_transform
    ds = datasets.ImageFolder(str(path / split), transform=eval_transform(size))
    loader = torch.utils.data.DataLoader(ds, batch_size=128)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def probe(train, ytrain, val, yval, classes: int, opt_name: str, args) -> float:
    torch.manual_seed(args.seed)
    head = nn.Linear(train.shape[1], classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    net = nn.Sequential(nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6), head)
    lr = args.blr * args.batch_size / 256
    if opt_name == "timm":
        from timm.optim import Lars
        opt = Lars(net.parameters(), lr=lr, weight_decay=args.weight_decay)
    else:
        opt = LARS(net.parameters(), lr=lr, weight_decay=args.weight_decay)
    steps = (len(train) + args.batch_size - 1) // args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train), generator=g)
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch + i / steps, lr, 0.0, args.warmup_epochs, args.epochs)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(net(train[idx]), ytrain[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return 100.0 * (net(val).argmax(1) == yval).float().mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True, help="train/ and val/ class folders")
    p.add_argument("--model", default="swin_pico_128", help="a registered classifier")
    p.add_argument("--input_size", type=int, default=64, help="image size fed to the encoder")
    p.add_argument("--finetune", default="", help="encoder weights (any checkpoint main_finetune loads)")
    p.add_argument("--batch_size", type=int, default=512, help="probe batch (MAE: 16384)")
    p.add_argument("--blr", type=float, default=0.1, help="base lr per 256 images (MAE: 0.1)")
    p.add_argument("--epochs", type=int, default=90, help="probe epochs (MAE: 90)")
    p.add_argument("--warmup_epochs", type=float, default=10, help="linear warmup epochs (MAE: 10)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="MAE: 0")
    p.add_argument("--seed", type=int, default=0, help="head init and batch order")
    p.add_argument("--json", default="", help="write the results here")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    root = Path(a.data_path)
    classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    model = models.create_model(a.model, num_classes=classes, img_size=a.input_size).eval()
    if a.finetune:
        from util.pretrained import load_pretrained
        print(load_pretrained(model, a.finetune).summary())
    t0 = time.time()
    train, ytrain = features(model, root, "train", a.input_size)
    val, yval = features(model, root, "val", a.input_size)
    res = {name: probe(train, ytrain, val, yval, classes, name, a) for name in ("timm", "mae")}
    res.update(args=vars(a), seconds=round(time.time() - t0, 1), n_train=len(train), n_val=len(val))
    print(f"probe top-1: timm Lars defaults {res['timm']:.2f}%   MAE's LARS {res['mae']:.2f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
