"""tools/dense_costs.py, the full-scale cost table's counts, on pico backbones: the FLOPs of a
known layer, every attention counted (the CPU's fused kernel has no formula in the counter), a
training pass between 2x and 3x the forward, and the bytes autograd saves under CUDA bf16 autocast
on fake tensors (no GPU, no memory)."""
import pytest
import torch
import torch.nn.functional as F

from tools.dense_costs import flops, saved_bytes


def test_attention_is_counted_as_its_matrix_products():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(), sdpa_kernel(SDPBackend.MATH):
        q = torch.empty(2, 3, 16, 8)
        with counter:
            F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 16 * 16 * 8)  # q k^T and (attn) v


@pytest.mark.parametrize("kind,backbone", [("gfl", "swin_pico_128"), ("upernet", "pvt_pico_128")])
def test_training_flops_and_saved_bytes_of_pico_models(kind, backbone):
    fwd = flops(kind, backbone, (64, 64), train=False)
    train = flops(kind, backbone, (64, 64), train=True)
    assert fwd > 0 and 2 * fwd < train <= 3 * fwd
    saved, params = saved_bytes(kind, backbone, 2, 64)
    assert params == sum(p.numel() for p in _real(kind, backbone).parameters()) and saved > 0


def _real(kind, backbone):
    from tools.dense_costs import _build
    return _build(kind, backbone)
