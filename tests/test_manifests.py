"""Checkpoint compatibility with the reference: exact keys, shapes and parameter counts."""
import json
import re

import pytest
import torch

import models

MANIFESTS = {
    "pretrain_swin_tiny": ("mae_swin_tiny_256", dict(norm_pix_loss=True, vis_mask_ratio=0.25)),
    "pretrain_pvt_small": ("mae_pvt_small_256", dict(norm_pix_loss=True, vis_mask_ratio=0.25)),
    "pretrain_vit_base": ("mae_vit_base_patch16_dec512d2b", dict(norm_pix_loss=True, vis_mask_ratio=0.25)),
    "finetune_swin_tiny": ("swin_tiny_256", dict(num_classes=1000, drop_path_rate=0.1)),
    "finetune_pvt_small": ("pvt_small_256", dict(num_classes=1000, drop_path_rate=0.1)),
    "finetune_vit_base": ("vit_base_patch16", dict(num_classes=1000, drop_path_rate=0.1, global_pool=True)),
}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_model_has_exactly_the_manifest_keys_and_shapes(reference_dir, manifest):
    spec = json.loads((reference_dir / "ummae_keys" / f"{manifest}.json").read_text())
    note = spec.pop("note")
    name, kwargs = MANIFESTS[manifest]
    model = models.create_model(name, **kwargs)
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == spec
    fake = {k: torch.randn(shape) for k, shape in spec.items()}
    result = model.load_state_dict(fake, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    total = int(re.search(r"total_params=(\d+)", note).group(1))
    trainable = int(re.search(r"requires_grad parameter elements: (\d+)", note).group(1))
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("name,total", [("mae_swin_large_256", 223_829_684),
                                        ("mae_swin_large_256_dec512d2b", 204_895_028),
                                        ("swin_large_256", 196_473_052)])
def test_swin_large_parameter_counts(name, total):
    with torch.device("meta"):
        model = models.create_model(name, **({"vis_mask_ratio": 0.25} if name.startswith("mae") else {}))
    assert sum(p.numel() for p in model.parameters()) == total
