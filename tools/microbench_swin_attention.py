"""Before/after of two Swin attention choices (PRETRAIN.md, speed work), on one UM-MAE Swin-T stage-1 block.

  bias:      position MLP evaluated per (query, key) pair   vs  once per distinct offset + gather
  attention: explicit softmax(q k^T * s + bias) v           vs  scaled_dot_product_attention(attn_mask=bias)

    python tools/microbench_swin_attention.py --batch_size 4 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.masking import secondary_mask, uniform_mask  # noqa: E402
from models.swin import Positions, _offset_index, _windows  # noqa: E402


def timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = models.create_model("mae_swin_tiny_256", vis_mask_ratio=0.25)
    n = a.batch_size
    mask = uniform_mask(n, 16, generator=torch.Generator().manual_seed(0))
    sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(1))
    _, kept, inter = model.forward_encoder(torch.randn(n, 3, 256, 256), mask, sm, return_intermediates=True)
    x0, pos0 = inter["x0"].detach(), inter["pos0"]
    positions = Positions(pos0, (64, 64), max_step=4)
    blk = model.blocks[1]                                   # shifted stage-1 block: 32x32 compact map, window 8
    attn = blk.attn
    idx, _ = _offset_index(positions, 32, 32, 8, 8, 4)
    p_win = _windows(torch.roll(pos0, (-4, -4), (1, 2)), 8, 8).float()
    heads = attn.num_heads

    def bias_per_pair():
        d = p_win.unsqueeze(1) - p_win.unsqueeze(2)
        rel = torch.sign(d) * torch.log1p(d.abs())
        h = F.relu(F.linear(rel, attn.posmlp[0].weight.flatten(1), attn.posmlp[0].bias))
        return F.linear(h, attn.posmlp[2].weight.flatten(1), attn.posmlp[2].bias).permute(0, 3, 1, 2)

    def bias_table():
        t = attn.offset_table(positions, torch.float32)
        return t.index_select(0, idx.reshape(-1)).view(*idx.shape, heads).permute(0, 3, 1, 2)

    def fwd_bwd(fn):
        return lambda: fn().sum().backward()

    assert torch.allclose(bias_per_pair(), bias_table(), atol=1e-6)
    xw = _windows(blk.norm1(x0).detach(), 8, 8)
    qkv = attn.qkv(xw).view(xw.shape[0], 64, 3, heads, -1).permute(2, 0, 3, 1, 4).detach()
    q, k, v = (t.clone().requires_grad_() for t in qkv.unbind(0))
    bias = bias_table().detach()

    def explicit():
        w = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
        return w.softmax(-1) @ v

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    assert torch.allclose(explicit(), sdpa(), atol=1e-5)
    rows = [("position bias, per pair (fwd+bwd)", timed(fwd_bwd(bias_per_pair), a.reps)),
            ("position bias, offset table + gather (fwd+bwd)", timed(fwd_bwd(bias_table), a.reps)),
            ("attention, explicit softmax (fwd+bwd)", timed(fwd_bwd(explicit), a.reps)),
            ("attention, SDPA with additive bias (fwd+bwd)", timed(fwd_bwd(sdpa), a.reps))]
    print(f"UM-MAE Swin-T stage-1 shifted block, batch {n}, {idx.shape[0]} windows of 64 tokens, "
          f"{a.threads} threads, median of {a.reps}")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} ms |")


if __name__ == "__main__":
    main()
