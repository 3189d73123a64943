"""Memory of the Swin relative-position bias in stage 1 (the blocks before the first patch merging).

    python tools/swin_bias_memory.py --model swin_tiny_256 --size 1024 --batch_size 1 --json out.json

Runs the patch embedding and the stage-1 blocks of a Swin classifier / dense backbone on a
``size`` x ``size`` input, with gradients, and counts (unique storages, bytes):

  * ``bias_bytes``: every additive mask handed to ``scaled_dot_product_attention`` (position bias,
    with the shifted-window mask folded in) plus every integer index autograd keeps (the offset
    indexes, the window gather). On a GPU the memory-efficient kernel keeps each block's mask for
    backward, so this is what the position bias holds from the forward until the backward;
  * ``saved_bytes``: every tensor autograd keeps for backward (parameters excluded), the masks and
    indexes included when the backend keeps them (on the CPU a mask that needs a gradient takes
    the math path, which keeps the attention weights instead).

A classifier runs on the regular token grid twice: with the shared bias (one per block, or per
window group with shifted windows) and, for comparison, with one bias per window (its positions
marked irregular, the path every window took before the bias was shared; outputs are bit-equal).
A UM-MAE Swin (``mae_swin_*``) runs stage 1 on its compact image, whose positions are each
sample's own: it has one bias per window.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import models
from models import swin as swin_module

MIB = 2 ** 20


def stage_one_bias_memory(model_name: str, size: int, batch_size: int, seed: int = 0, shared: bool = True) -> dict:
    """Bytes of stage 1's position bias and of everything it saves for backward (see the module doc);
    ``shared=False``: a classifier's grid positions marked irregular (one bias per window)."""
    torch.manual_seed(seed)
    mae = model_name.startswith("mae_")
    kwargs = dict(img_size=size, vis_mask_ratio=0.25) if mae else dict(num_classes=0)
    model = models.create_model(model_name, **kwargs).train()
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    masks: dict[int, int] = {}
    saved: dict[int, int] = {}
    index: dict[int, int] = {}
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            s = attn_mask.untyped_storage()
            masks[s.data_ptr()] = s.nbytes()
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr and ptr not in params:
            saved[ptr] = s.nbytes()
            if not t.is_floating_point():
                index[ptr] = s.nbytes()
        return t

    first = [i for i, blk in enumerate(model.blocks) if blk.downsample is not None]
    stage1 = model.blocks[: first[0] if first else len(model.blocks)]
    imgs = torch.randn(batch_size, 3, size, size)
    swin_module.F.scaled_dot_product_attention = spy
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if mae:
                from models.masking import secondary_mask, uniform_mask
                mask = uniform_mask(batch_size, model.token_size, generator=torch.Generator().manual_seed(seed))
                sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(seed + 1))
                # the encoder up to stage 1's input: reuse the model's own compaction, then stage 1 alone
                captured = {}

                def capture(x, positions):
                    captured.update(x=x, positions=positions)
                    raise StopIteration

                model.run_blocks = capture
                try:
                    model.forward_encoder(imgs, mask, sm)
                except StopIteration:
                    pass
                x, positions = captured["x"], captured["positions"]
            else:
                x = model.patch_embed(imgs)
                positions = swin_module.Positions.grid(x.shape[1], x.shape[2], x.device)
                positions.regular = shared
            for blk in stage1:
                x = blk(x, positions)
            out = x.float().sum()
    finally:
        swin_module.F.scaled_dot_product_attention = real_sdpa
    del out
    bias = sum(masks.values()) + sum(v for k, v in index.items() if k not in masks)
    return {"model": model_name, "input_size": size, "batch_size": batch_size, "stage1_blocks": len(stage1),
            "bias": "per window" if mae or not shared else "shared",
            "mask_bytes": sum(masks.values()), "index_bytes": sum(index.values()), "bias_bytes": bias,
            "saved_bytes": sum(saved.values())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="swin_tiny_256", help="a Swin classifier or a UM-MAE Swin (mae_swin_*)")
    p.add_argument("--size", type=int, default=1024, help="input side, pixels")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    if not a.model.startswith(("swin_", "mae_swin_")) or a.model not in models.list_models():
        p.error(f"--model {a.model!r}: a registered Swin classifier (swin_*) or UM-MAE Swin (mae_swin_*)")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [stage_one_bias_memory(a.model, a.size, a.batch_size)]
    if not a.model.startswith("mae_"):
        rows.append(stage_one_bias_memory(a.model, a.size, a.batch_size, shared=False))
    for r in rows:
        print(f"{r['model']} at {r['input_size']} px, batch {r['batch_size']}, stage 1 ({r['stage1_blocks']} blocks), "
              f"{r['bias']} bias: {r['bias_bytes'] / MIB:.1f} MiB (masks {r['mask_bytes'] / MIB:.1f}, indexes "
              f"{r['index_bytes'] / MIB:.1f}); saved for backward {r['saved_bytes'] / MIB:.1f} MiB")
    report = {"command": "python tools/swin_bias_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "results": rows}
    if len(rows) == 2:
        report["bias_ratio_per_window_over_shared"] = rows[1]["bias_bytes"] / rows[0]["bias_bytes"]
        print(f"per-window / shared bias memory: {report['bias_ratio_per_window_over_shared']:.0f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
