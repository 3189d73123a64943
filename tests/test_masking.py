"""Mask invariants: exact counts, one kept unit per 2x2 group, uniform frequencies."""
import math

import pytest
import torch

from models.masking import (check_uniform_mask, draw_masks, kept_index_per_group, num_removed, random_mask,
                            secondary_mask, uniform_mask)


def chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor, dof: int) -> float:
    """Upper-tail p-value of Pearson's chi-square (Wilson-Hilferty approximation)."""
    x = float(((counts - expected) ** 2 / expected).sum())
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_uniform_mask_keeps_exactly_one_unit_per_group():
    g = torch.Generator().manual_seed(0)
    masks = uniform_mask(5000, 16, generator=g)
    assert masks.shape == (5000, 256) and masks.dtype == torch.bool
    assert (masks.sum(1) == 192).all()
    cells = masks.view(-1, 8, 2, 8, 2).permute(0, 1, 3, 2, 4).reshape(-1, 8, 8, 4)
    assert ((~cells).sum(-1) == 1).all()
    check_uniform_mask(masks, 16)


def test_uniform_mask_frequencies_are_uniform():
    g = torch.Generator().manual_seed(1)
    kept = kept_index_per_group(uniform_mask(4000, 16, generator=g), 16)    # (N, 8, 8)
    counts = torch.nn.functional.one_hot(kept, 4).sum(0).double()           # per group, per cell
    p = chi2_pvalue(counts, torch.full_like(counts, 1000.0), dof=64 * 3)
    assert p > 1e-3, p
    # per position keep frequency over the 256 units
    keep_freq = (~uniform_mask(4000, 16, generator=g)).double().sum(0)
    p = chi2_pvalue(keep_freq, torch.full_like(keep_freq, 1000.0), dof=255)
    assert p > 1e-3, p


def test_uniform_mask_layout_matches_reference_masks(reference_dir):
    """The reference's 2000 masks obey the same layout: raster order, True = removed."""
    ref = torch.load(reference_dir / "golden" / "uniform_masks_16.pt", weights_only=True)["masks"].bool()
    check_uniform_mask(ref, 16)
    kept = kept_index_per_group(ref, 16)
    for n in range(0, 2000, 397):  # spot-check against a naive loop
        for a in range(8):
            for b in range(8):
                cell = [ref[n, (2 * a + i) * 16 + 2 * b + j].item() for i in (0, 1) for j in (0, 1)]
                assert cell.index(False) == kept[n, a, b]
    freq = (~ref).double().mean(0)
    assert abs(freq.mean().item() - 0.25) < 1e-12


def test_random_mask_counts_and_uniformity():
    g = torch.Generator().manual_seed(2)
    masks = random_mask(4000, 196, 0.75, generator=g)
    assert (masks.sum(1) == int(0.75 * 196)).all()
    counts = masks.double().sum(0)
    expected = torch.full_like(counts, 4000 * 147 / 196)
    # positions are not independent (fixed total), the test is still a fair uniformity check
    assert chi2_pvalue(counts, expected, dof=195) > 1e-3


@pytest.mark.parametrize("make,kept", [(lambda g: uniform_mask(3000, 16, generator=g), 64),
                                       (lambda g: uniform_mask(3000, 14, generator=g), 49),
                                       (lambda g: random_mask(3000, 196, 0.75, generator=g), 49)])
def test_secondary_mask_exact_count_subset_and_uniform(make, kept):
    g = torch.Generator().manual_seed(3)
    mask = make(g)
    sm = secondary_mask(mask, 0.25, generator=g)
    expect = kept - int(kept * 0.75)                      # 16 of 64, 13 of 49
    assert (sm.sum(1) == expect).all()
    assert not (sm & mask).any()
    # uniform among kept units: SM frequency of a unit given that it is kept
    kept_counts = (~mask).double().sum(0)
    sm_counts = sm.double().sum(0)
    valid = kept_counts > 0
    expected = kept_counts[valid] * expect / kept
    assert chi2_pvalue(sm_counts[valid], expected, dof=int(valid.sum()) - 1) > 1e-3


def test_masks_are_reproducible_from_a_seed_and_differ_across_seeds():
    a = draw_masks(8, 16, 0.75, True, generator=torch.Generator().manual_seed(7))
    b = draw_masks(8, 16, 0.75, True, generator=torch.Generator().manual_seed(7))
    c = draw_masks(8, 16, 0.75, True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_mask_arguments_fail_clearly():
    with pytest.raises(ValueError, match="even"):
        uniform_mask(2, 7)
    with pytest.raises(ValueError, match="mask_ratio 0.75"):
        draw_masks(2, 16, 0.6, True)
    with pytest.raises(ValueError, match="uniform masks"):
        check_uniform_mask(random_mask(4, 256, 0.75, generator=torch.Generator().manual_seed(0)), 16)


def test_random_mask_count_is_maes_len_keep_rule():
    """MAE keeps len_keep = int(L * (1 - r)) units; MixMAE sets int(L * r). They differ whenever L * r
    is fractional: 49 units at 0.75 -> MAE/GreenMIM remove 37 (keep 12), int(0.75 * 49) would be 36.
    Float arithmetic as MAE's: 50 * (1 - 0.9) = 4.999... keeps 4, so 46 of 50 are removed."""
    cases = [(49, 0.75, 37), (49, 0.5, 25), (196, 0.75, 147), (36, 0.75, 27), (64, 0.6, 39), (50, 0.9, 46)]
    for length, ratio, removed in cases:
        assert num_removed(length, ratio) == length - int(length * (1 - ratio)) == removed
        masks = random_mask(3, length, ratio, generator=torch.Generator().manual_seed(0))
        assert (masks.sum(1) == removed).all()
    assert num_removed(49, 0.5, "remove") == 24 and num_removed(49, 0.75, "remove") == 36
    assert (draw_masks(2, 7, 0.5, False, rounding="remove").sum(1) == 24).all()
    with pytest.raises(ValueError, match="rounding"):
        num_removed(49, 0.5, "round")


def test_models_declare_the_originals_mask_counts():
    import models
    green = models.create_model("greenmim_swin_pico_patch4_win6_dec64b1")   # 3x3 units at 96 px
    assert green.num_visible == int(9 * 0.25) == 2
    assert getattr(green, "mask_rounding", "keep") == "keep"
    with torch.device("meta"):
        base = models.create_model("greenmim_swin_base_patch4_dec512b1")   # 224 px, 7x7 units
    assert base.num_visible == 12                                            # the original's len_keep
    mix = models.create_model("mixmim_pico")
    assert mix.mask_rounding == "remove"
