"""Window attention as the GPU kernels want it: the Swin position bias shared where windows share
offsets (bit-equal outputs, a fraction of the memory), computed in float32 under bf16 autocast,
every additive mask aligned for the memory-efficient kernel, Hiera's attention 4-D."""
import pytest
import torch
import torch.nn.functional as F

import models
from models import swin
from models.masking import random_mask, secondary_mask, uniform_mask
from tools.swin_bias_memory import stage_one_bias_memory


@pytest.fixture
def per_window_grid(monkeypatch):
    """Positions.grid marked irregular: every window gathers its own bias (the per-window path)."""
    grid = swin.Positions.grid

    def irregular(h, w, device):
        p = grid(h, w, device)
        p.regular = False
        return p
    return lambda: monkeypatch.setattr(swin.Positions, "grid", staticmethod(irregular))


def _swin_runs():
    def cls(m):
        return m(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)))

    def pyramid(m):  # 150 x 230: padded windows in stages 1-2, shifted windows with wrapped rows
        return torch.cat([f.flatten() for f in m.forward_pyramid(
            torch.randn(1, 3, 150, 230, generator=torch.Generator().manual_seed(1)))])

    def simmim(m):
        mask = random_mask(2, m.token_size ** 2, 0.75, generator=torch.Generator().manual_seed(0))
        return m(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)), mask)[1]
    return [("swin_pico_128", dict(num_classes=5), cls), ("swin_pico_128", dict(num_classes=0), pyramid),
            ("simmim_swin_pico_128", {}, simmim)]


@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_shared_bias_is_bit_equal_to_one_bias_per_window(per_window_grid, grad):
    results = {}
    for shared in (True, False):
        if not shared:
            per_window_grid()
        for name, kwargs, run in _swin_runs():
            torch.manual_seed(0)
            m = models.create_model(name, **kwargs).train(grad)
            with torch.set_grad_enabled(grad):
                out = run(m)
            grads = []
            if grad:
                out.double().square().sum().backward()
                grads = [p.grad for p in m.parameters() if p.grad is not None]
            results.setdefault((name, str(kwargs)), []).append((out.detach(), grads))
    for key, ((a, ga), (b, gb)) in results.items():
        assert torch.equal(a, b), key
        if ga:  # gradients: the same sums in another order
            x, y = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
            assert ((x - y).norm() / y.norm()).item() < 1e-6, key


def test_shared_bias_takes_a_tenth_of_the_memory_or_less():
    # 256 px on the pico Swin (window 8): stage 1 is 64 x 64 tokens in 64 windows of 64
    shared = stage_one_bias_memory("swin_pico_128", 256, 1)
    per_window = stage_one_bias_memory("swin_pico_128", 256, 1, shared=False)
    assert shared["bias"] == "shared" and per_window["bias"] == "per window"
    assert per_window["bias_bytes"] >= 10 * shared["bias_bytes"], (per_window, shared)


def test_position_bias_gradient_keeps_float32_precision_under_bf16():
    """A Swin-T stage-1 block on UM-MAE's compact image at batch 8: the position MLP's gradient under
    bf16 autocast is as close to float32's as the qkv weights' (the gather accumulates in float32;
    with a bf16 table it was 7.6x worse than qkv's here, 0.75x with the float32 table)."""
    torch.manual_seed(0)
    m = models.mae.MaskedAutoencoderSwin(img_size=256, embed_dim=96, depths=(2, 2), num_heads=(3, 3), window_size=8,
                                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).train()
    mask = uniform_mask(8, m.token_size, generator=torch.Generator().manual_seed(0))
    captured = {}

    def capture(x, positions):
        captured.update(x=x.detach(), positions=positions)
        raise StopIteration
    m.run_blocks = capture
    with pytest.raises(StopIteration):
        m.forward_encoder(torch.randn(8, 3, 256, 256, generator=torch.Generator().manual_seed(2)), mask)
    x0, pos = captured["x"], captured["positions"]
    blk = m.blocks[0]                                   # 16 windows of 64 tokens per sample
    weight = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))

    def grads(amp: bool) -> dict:
        blk.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = blk(x0, swin.Positions(pos.pos, pos.extent, max_step=pos.max_step))
        (y.float() * weight).sum().backward()
        return {n: p.grad.clone() for n, p in blk.named_parameters()}
    ref, bf = grads(False), grads(True)
    err = {n: ((bf[n] - ref[n]).norm() / ref[n].norm()).item() for n in ("attn.posmlp.0.weight", "attn.qkv.weight")}
    assert err["attn.posmlp.0.weight"] <= 3 * err["attn.qkv.weight"], err


def _sdpa_calls(monkeypatch) -> list:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q, attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _pretrain_step(name: str, batch: int = 2, **kwargs):
    torch.manual_seed(0)
    m = models.create_model(name, **kwargs).train()
    c = m.contract
    gen = torch.Generator().manual_seed(0)
    if c.mask_kind == "uniform":
        mask = uniform_mask(batch, c.token_size, generator=gen)
        sm = secondary_mask(mask, 0.25, generator=gen) if c.secondary_mask and kwargs.get("vis_mask_ratio") else None
    else:
        mask = random_mask(batch, c.token_size ** 2, c.default_mask_ratio, generator=gen)
        sm = None
    imgs = torch.randn(batch, 3, c.input_size, c.input_size, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (m(imgs, mask, sm) if sm is not None else m(imgs, mask))[0]
    loss.backward()


@pytest.mark.parametrize("name, kwargs", [("mae_swin_pico_128", dict(vis_mask_ratio=0.25)),
                                          ("simmim_swin_pico_128", {}), ("mixmim_pico", {}),
                                          ("greenmim_swin_pico_patch4_win6_dec64b1", {})])
def test_every_additive_mask_is_aligned_and_in_the_attention_dtype(monkeypatch, name, kwargs):
    calls = _sdpa_calls(monkeypatch)
    _pretrain_step(name, **kwargs)
    masked = [(q, m) for q, m in calls if m is not None]
    assert masked, name
    for q, m in masked:
        assert m.dtype == q.dtype == torch.bfloat16, (name, m.dtype, q.dtype)
        assert m.stride(-1) == 1 and all(s % 8 == 0 for s in m.stride()[:-1]), (name, m.shape, m.stride())


@pytest.mark.parametrize("name", ["mae_hiera_pico_128", "hiera_pico_128"])
def test_hiera_attention_is_four_dimensional_and_unchanged(monkeypatch, name):
    from timm.models.hiera import MaskUnitAttention
    torch.manual_seed(0)
    m = models.create_model(name).eval()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 128, 128, generator=gen)
    if name.startswith("mae_"):
        mask = random_mask(2, m.token_size ** 2, m.mask_ratio, generator=gen)
        run = lambda: m(imgs, mask)[1]  # noqa: E731
    else:
        run = lambda: m(imgs)  # noqa: E731
    calls = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        out = run()
        assert calls and all(q.dim() == 4 for q, _ in calls), sorted({tuple(q.shape) for q, _ in calls})
        # timm's own (5-D) forward gives the same numbers
        for mod in m.modules():
            if isinstance(mod, MaskUnitAttention):
                mod.forward = MaskUnitAttention.forward.__get__(mod)
        ref = run()
    assert any(q.dim() == 5 for q, _ in calls)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
