"""The model contract (models.contract) over every registered name: complete, consistent with the
model, enough to drive a training step, and every pretraining checkpoint loads into its classifier."""
import dataclasses
import functools

import pytest
import torch

import models
from models.contract import ClassifierContract, PretrainContract
from models.masking import draw_masks, secondary_mask
from util.pretrained import HEAD_PREFIXES, load_state

PRETRAIN = models.list_models(task="pretrain")
CLASSIFY = models.list_models(task="classify")
OPTIONS = {"mask_ratio", "reference_decoder_order"}


@functools.lru_cache(maxsize=None)
def _meta(name, **kwargs):
    """One meta-device build per name and keywords (the large variants take a while even without weights)."""
    with torch.device("meta"):
        return models.create_model(name, **kwargs)


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretraining_contract_is_complete(name):
    model = _meta(name)
    c = model.contract
    assert isinstance(c, PretrainContract) and c.classifier == models.classifier_for(name)
    for f in dataclasses.fields(c):
        assert getattr(c, f.name) is not None, (name, f.name)
    assert c.family and c.mask_kind in ("uniform", "random", "any") and 0 < c.default_mask_ratio < 1
    assert c.stride > 0 and c.token_size * c.stride == c.input_size and c.grid(c.input_size) == c.token_size
    assert c.images_per_sample >= 1 and set(c.options) <= OPTIONS and c.mask_rounding in ("keep", "remove")
    assert c.norm_pix_unit > 0 and c.stride % c.norm_pix_unit == 0 and c.mask_note
    names = {n for n, _ in model.named_parameters()}
    assert c.no_weight_decay <= names, sorted(c.no_weight_decay - names)[:4]
    assert c.classifier in CLASSIFY, (name, c.classifier)


@pytest.mark.parametrize("name", CLASSIFY)
def test_classifier_contract_is_complete(name):
    model = _meta(name, num_classes=10)
    c = model.contract
    assert isinstance(c, ClassifierContract) and c.family and c.input_size > 0 and c.num_layers >= 1
    ids = {n: c.layer_id(n) for n, _ in model.named_parameters()}
    assert all(0 <= i <= c.num_layers for i in ids.values()), name
    heads = [i for n, i in ids.items() if n.startswith("head.")]
    # the head is in the last group (num_layers; MixMIM's original rule puts it one below, a reproduced quirk)
    assert heads and all(i == max(ids.values()) for i in heads) and min(ids.values()) == 0
    if c.pyramid is not None:
        channels, strides = c.pyramid
        assert len(channels) == len(strides) and all(s > 0 for s in strides)


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretraining_checkpoint_loads_into_its_classifier(name):
    """Only the head (and fc_norm, which pretraining has not) may be missing; nothing unexpected."""
    pre = _meta(name)
    cls = _meta(pre.contract.classifier, num_classes=10, img_size=pre.contract.input_size)
    report = load_state(cls, pre.state_dict(), name)
    assert not report.unexpected, (name, report.unexpected[:4])
    assert all(k.startswith(HEAD_PREFIXES) for k in report.missing), (name, report.missing[:4])
    assert report.loaded > 0 and not report.resized


def _step_models() -> list[str]:
    """One tiny model per method family: the first "pico" variant of each (a new method's too, with no
    edit here; each family's own test file covers its other variants)."""
    first = {}
    for name in PRETRAIN:
        if "pico" in name:
            first.setdefault(_meta(name).contract.family, name)
    return sorted(first.values())


STEP_MODELS = _step_models()


def test_step_models_cover_every_family():
    assert {_meta(n).contract.family for n in STEP_MODELS} == {_meta(n).contract.family for n in PRETRAIN}


@pytest.mark.parametrize("name", STEP_MODELS)
def test_contract_alone_drives_a_training_step(name):
    """A step built only from the contract (masks, ratio, rounding, secondary mask) runs forward and backward."""
    torch.manual_seed(0)
    probe = models.describe(name)
    vmr = 0.25 if probe.secondary_mask else 0.0
    model = models.create_model(name, vis_mask_ratio=vmr, norm_pix_loss=not probe.raw_pixel_recipe)
    c = model.contract
    gen = torch.Generator().manual_seed(0)
    uniform = c.mask_kind == "uniform" or (c.mask_kind == "any" and c.token_size % 2 == 0)
    n = 2
    mask = draw_masks(n, c.token_size, 0.75 if uniform else c.default_mask_ratio, uniform, generator=gen,
                      rounding=c.mask_rounding)
    sm = secondary_mask(mask, vmr, generator=gen) if vmr > 0 else None
    imgs = torch.randn(n * c.images_per_sample, 3, c.input_size, c.input_size)
    loss, pred, used = model(imgs, mask, sm)
    assert torch.isfinite(loss) and pred.shape[:2] == (n, c.token_size ** 2) and used.shape == mask.shape
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
