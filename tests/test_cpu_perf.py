"""engine/cpu_perf.py: oneDNN linear layers give nn.Linear's results and gradients; the malloc setting respects the user."""
import copy

import pytest
import torch
from torch import nn

import models
from models.masking import draw_masks, secondary_mask
from engine import cpu_perf
from engine.cpu_perf import OneDNNLinear, onednn_linear_available, setup_cpu_training, use_onednn_linear

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


def _pair(in_f: int, out_f: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    fast = copy.deepcopy(ref)
    assert use_onednn_linear(fast) == 1 and type(fast) is OneDNNLinear
    return ref, fast


@needs_onednn
@pytest.mark.parametrize("in_f, out_f", [(24, 96), (96, 24)])  # both ways of transposing for the weight gradient
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_nn_linear_values_and_gradients(in_f, out_f, bias):
    ref, fast = _pair(in_f, out_f, bias)
    x = torch.randn(3, in_f, 5, 7).permute(0, 2, 3, 1)  # a non-contiguous (B, H, W, C) input, as in the encoders
    outs, grads = [], []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert outs[1].shape == outs[0].shape == (3, 5, 7, out_f)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        assert g_fast.shape == g_ref.shape
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_double_backward_matches_nn_linear():
    """create_graph=True (gradient penalties) must give the true second derivative, not drop terms."""
    ref, fast = _pair(6, 5, True)
    x = torch.randn(3, 6)
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(torch.tanh(m(xi)).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        results.append((gx.detach(), m.weight.grad, xi.grad))
    assert results[0][1].norm() > 0
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_frozen_weight_saves_no_input_for_backward():
    _, fast = _pair(16, 32, True)
    fast.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast(x).sum().backward()
    assert [t.shape for t in saved] == [fast.weight.shape] and x.grad is not None


@needs_onednn
def test_inputs_oneDNN_does_not_serve_take_aten_linear_unchanged():
    ref, fast = _pair(16, 32, True)
    x64 = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(fast.double()(x64), ref.double()(x64))  # float64 (the golden tests) is bit-identical
    ref, fast = _pair(16, 32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its precision choice
        assert fast(torch.randn(4, 16)).dtype == torch.bfloat16


@needs_onednn
def test_swapped_pretraining_model_keeps_keys_loss_and_bitwise_reproducible_gradients():
    torch.manual_seed(0)
    ref = models.create_model("mae_pvt_pico_128", vis_mask_ratio=0.25)
    fast = copy.deepcopy(ref)
    n_linear = sum(type(m) is nn.Linear for m in ref.modules())
    assert use_onednn_linear(fast) == n_linear > 0
    assert list(fast.state_dict()) == list(ref.state_dict())
    imgs = torch.randn(4, 3, 128, 128)
    mask = draw_masks(4, 8, 0.75, True, generator=torch.Generator().manual_seed(0))
    sm = secondary_mask(mask, 0.25, generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (ref, fast, fast):
        model.zero_grad()
        loss = model(imgs, mask, sm)[0]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ref, g_ref), (loss_fast, g_fast), (loss_again, g_again) = grads
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    assert set(g_fast) == set(g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)
    # exact resume needs deterministic kernels
    assert torch.equal(loss_again, loss_fast) and all(torch.equal(g_again[n], g_fast[n]) for n in g_fast)


def test_setup_applies_only_to_cpu_runs_and_names_what_it_did(monkeypatch):
    monkeypatch.setattr(cpu_perf, "retain_freed_memory", lambda: True)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    assert setup_cpu_training(model, torch.device("cuda"), "onednn", compiled=False) == ""
    assert all(type(m) is not OneDNNLinear for m in model)
    note = setup_cpu_training(model, torch.device("cpu"), "aten", compiled=False, malloc=True)
    assert "aten" in note and "malloc keeps freed memory" in note
    assert "plain PyTorch" in setup_cpu_training(model, torch.device("cpu"), "aten", compiled=False)
    assert all(type(m) is not OneDNNLinear for m in model)
    assert "inductor" in setup_cpu_training(model, torch.device("cpu"), "onednn", compiled=True)
    if onednn_linear_available():
        assert "2 linear layers on oneDNN" in setup_cpu_training(model, torch.device("cpu"), "onednn", compiled=False)
        assert type(model[0]) is OneDNNLinear and type(model[2]) is OneDNNLinear


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_malloc_setting_leaves_a_users_own_choice_alone(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cpu_perf.retain_freed_memory() is False


@needs_onednn
def test_pretraining_on_onednn_follows_the_aten_run(tmp_path, capsys):
    """--cpu_matmul onednn (part of --cpu_tuning) trains like --cpu_matmul aten (the default), up to fp32 rounding."""
    import json

    import main_pretrain
    common = ["--model", "mae_pvt_pico_128", "--mask_regular", "--vis_mask_ratio", "0.25", "--norm_pix_loss",
              "--num_workers", "0", "--print_freq", "1000", "--device", "cpu", "--batch_size", "3", "--epochs", "2",
              "--warmup_epochs", "1", "--lr", "1e-3", "--log_dir", ""]
    losses = {}
    for kind in ("aten", "onednn"):
        out = tmp_path / kind
        assert main_pretrain.main(main_pretrain.parse_args(common + ["--cpu_matmul", kind, "--output_dir", str(out)])) == 0
        text = capsys.readouterr().out
        assert ("linear layers on oneDNN" in text) == (kind == "onednn"), text
        losses[kind] = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert losses["onednn"] == pytest.approx(losses["aten"], rel=1e-4)


def test_cpu_tuning_is_opt_in_and_one_flag_turns_it_on(tmp_path, monkeypatch):
    """The programs run plain PyTorch unless asked; --cpu_tuning selects oneDNN and the malloc setting,
    --cpu_matmul still chooses the linear layers alone."""
    import main_finetune
    import main_pretrain
    calls = []
    monkeypatch.setattr(cpu_perf, "retain_freed_memory", lambda: calls.append(1) or True)
    base = ["--model", "mae_swin_pico_128", "--mask_regular", "--output_dir", str(tmp_path), "--log_dir", ""]
    for argv, matmul, tuning in ((base, "aten", False), (base + ["--cpu_tuning"], "onednn", True),
                                 (base + ["--cpu_tuning", "--cpu_matmul", "aten"], "aten", True),
                                 (base + ["--cpu_matmul", "onednn"], "onednn", False)):
        args = main_pretrain.parse_args(argv)
        assert (args.cpu_matmul, args.cpu_tuning) == (matmul, tuning), argv
    assert main_finetune.get_args_parser().parse_args([]).cpu_tuning is False
    model = nn.Sequential(nn.Linear(4, 4))
    setup_cpu_training(model, torch.device("cpu"), "aten", compiled=False)  # the programs' default call
    assert calls == [] and type(model[0]) is nn.Linear
