"""MAE's linear-probe optimizer: LARS step for step against the formula; the probe's defaults."""
import dataclasses
import math

import pytest
import torch

from engine.lars import LARS


def _reference_step(p, g, mu, lr, wd, momentum, trust):
    """One LARS step written out element by element in float64 Python (MAE's rule)."""
    if len(p) > 1 and isinstance(p[0], list):          # a 2-D weight: decay + trust ratio
        flat_p = [x for row in p for x in row]
        d = [[gij + wd * pij for gij, pij in zip(grow, prow)] for grow, prow in zip(g, p)]
        pn = math.sqrt(sum(x * x for x in flat_p))
        dn = math.sqrt(sum(x * x for row in d for x in row))
        q = trust * pn / dn if pn > 0 and dn > 0 else 1.0
        d = [[q * x for x in row] for row in d]
        mu = [[momentum * m + x for m, x in zip(mrow, drow)] for mrow, drow in zip(mu, d)]
        p = [[x - lr * m for x, m in zip(prow, mrow)] for prow, mrow in zip(p, mu)]
    else:                                               # 1-D: neither decayed nor adapted
        mu = [momentum * m + x for m, x in zip(mu, g)]
        p = [x - lr * m for x, m in zip(p, mu)]
    return p, mu


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_the_formula_step_for_step(wd):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    zero = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)   # ||p|| = 0: ratio 1
    opt = LARS([w, b, zero], lr=0.5, weight_decay=wd)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["trust_coefficient"] == 0.001
    ref = {"w": (w.tolist(), [[0.0] * 3 for _ in range(4)]), "b": (b.tolist(), [0.0] * 4),
           "zero": (zero.tolist(), [[0.0] * 2 for _ in range(2)])}
    for step, lr in enumerate((0.5, 0.3, 0.1)):
        for group in opt.param_groups:
            group["lr"] = lr                              # as engine.schedule does every step
        grads = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in
                 (("w", w), ("b", b), ("zero", zero))}
        for t, k in ((w, "w"), (b, "b"), (zero, "zero")):
            t.grad = grads[k].clone()
        opt.step()
        for t, k in ((w, "w"), (b, "b"), (zero, "zero")):
            p, mu = _reference_step(*ref[k][:1], grads[k].tolist(), ref[k][1], lr, wd, 0.9, 0.001)
            ref[k] = (p, mu)
            assert torch.allclose(t.detach(), torch.tensor(p, dtype=torch.float64), rtol=1e-12, atol=1e-14), (k, step)
    # with weight decay 0 the trust ratio still scales the weight's step: far below plain SGD's
    assert (w.detach() - torch.tensor(ref["w"][0], dtype=torch.float64)).abs().max() < 1e-14


def test_lars_skips_parameters_without_gradient_and_rejects_bad_settings():
    p = torch.ones(3, 3, requires_grad=True)
    opt = LARS([p], lr=1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 3)) and not opt.state
    for bad in (dict(lr=-1.0), dict(momentum=1.0), dict(trust_coefficient=0.0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match="LARS needs"):
            LARS([p], **bad)


def test_linear_probe_uses_maes_lars_and_the_vit_cls_token(tmp_path):
    import main_finetune
    from main_linprobe import LINPROBE_DEFAULTS
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "0.png")
    args = main_finetune.parse_args(["--model", "vit_pico_patch16", "--data_path", str(tmp_path), "--nb_classes", "1",
                                     "--device", "cpu", "--output_dir", str(tmp_path / "o")], defaults=LINPROBE_DEFAULTS)
    assert args.global_pool is False
    model = main_finetune.build_model(args, torch.device("cpu"))
    assert model.global_pool == "token"
    args = dataclasses.replace(args, lr=0.1)   # main() sets it from --blr
    opt = main_finetune.make_optimizer(args, model, torch.device("cpu"))
    assert isinstance(opt, LARS) and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0.0
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    args = main_finetune.parse_args(["--model", "vit_pico_patch16", "--data_path", str(tmp_path), "--nb_classes", "1",
                                     "--device", "cpu", "--global_pool"], defaults=LINPROBE_DEFAULTS)
    assert args.global_pool is True and main_finetune.build_model(args, torch.device("cpu")).global_pool == "avg"
