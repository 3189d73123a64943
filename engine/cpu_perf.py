"""Optional CPU optimisation, off by default: fp32 linear layers through oneDNN and a malloc that
keeps freed memory.

Nothing here is needed for correct training, and GPU runs never use it. A program applies it
only when asked: ``--cpu_tuning`` turns both settings on for a run on a CPU device
(``main_pretrain.py``, ``main_finetune.py``, ``tools/benchmark.py``; ``scripts/demo.sh`` passes
it); ``--cpu_matmul onednn`` alone turns on just the linear layers. Without these flags a run
uses PyTorch's own ``F.linear`` and the system allocator. The model files stay plain PyTorch,
and neither setting changes a parameter, a key or a result beyond fp32 rounding. Measurements
are in PRETRAIN.md ("Speed work"). What the two settings do, and what they cost:

* ``torch.mm`` / ``F.linear`` on x86 CPUs call MKL's sgemm, which does not take its AVX-512
  path on AMD processors. :func:`use_onednn_linear` changes the class of every plain
  ``nn.Linear`` to :class:`OneDNNLinear`, whose forward and both backward GEMMs call oneDNN
  (``torch.ops.mkldnn._linear_pointwise``, a private PyTorch op: the kernel inductor uses for
  frozen, inference-only CPU linears) through a hand-written backward. Inputs it cannot serve
  (float64, bf16 autocast, CUDA) fall back to ``F.linear``; a double backward
  (``create_graph=True``) runs on aten's matmuls so that it stays differentiable. ``torch.func``
  transforms are not supported: leave the setting off with them.
* glibc's malloc hands large tensors out as fresh ``mmap`` regions and trims its heap after
  frees, so each training step faults in, and the kernel zeroes, the same hundreds of MiB
  again. :func:`retain_freed_memory` changes the allocator of the whole process (``mallopt``)
  to keep freed memory, as PyTorch's CUDA caching allocator does on a GPU. The process then
  holds on to its peak memory; an allocation pattern that fragments the heap can raise that
  peak. A user's own allocator choice is left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.cpu_flags import add_cpu_tuning_args  # noqa: F401  (re-exported: tools/benchmark.py)

__all__ = ["retain_freed_memory", "onednn_linear_available", "use_onednn_linear", "OneDNNLinear",
           "setup_cpu_training", "add_cpu_tuning_args"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # the largest value glibc accepts on 64-bit
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def retain_freed_memory() -> bool:
    """Serve tensors up to 32 MiB from the heap and never trim it (glibc only).

    Returns whether the setting was applied. It is left alone where the user
    already chose: ``MALLOC_*_`` variables, malloc ``GLIBC_TUNABLES`` or a
    preloaded allocator (jemalloc, tcmalloc, mimalloc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in _MALLOC_ENV) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # -1 disables trimming (mallopt(3)); fixing the mmap threshold also stops glibc's own adjustment
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def _onednn_gemm(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x: (M, K), w: (N, K) -> x @ w.T + b: (M, N). ``w`` may be a strided view; ``x`` is made contiguous."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        # save only what the backward reads: x for dW, W for dx
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.in_shape = x.shape
        ctx.has_bias = bias is not None
        return _onednn_gemm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        # grad mode is on here only under create_graph=True: the oneDNN op has no derivative, aten's do
        differentiable = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight if differentiable else _onednn_gemm(g2, weight.t())).view(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            # dW = g^T x. oneDNN copies its (transposed) left operand, so transpose the narrower one.
            out_f, in_f = g2.shape[1], x2.shape[1]
            if differentiable:
                gw = g2.t() @ x2
            else:
                gw = _onednn_gemm(g2.t(), x2.t()) if out_f <= in_f else _onednn_gemm(x2.t(), g2.t()).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU GEMMs run on oneDNN; same parameters, keys and results up to fp32 rounding."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN linear kernel and it agrees with ``F.linear``."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((8, 16), (24, 16), (24,)))
        return torch.allclose(_onednn_gemm(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def use_onednn_linear(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into :class:`OneDNNLinear` in place; returns how many.

    Subclasses of ``nn.Linear`` are left alone (``nn.MultiheadAttention`` reads
    its ``out_proj`` weights directly, for one).
    """
    if not onednn_linear_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def setup_cpu_training(model: nn.Module, device: torch.device, cpu_matmul: str, compiled: bool,
                       malloc: bool = False) -> str:
    """Apply the requested CPU settings for a run on ``device``; returns a line for the log.

    ``cpu_matmul``: 'onednn' swaps the linear layers (:func:`use_onednn_linear`), 'aten' keeps
    them. ``malloc=True`` also calls :func:`retain_freed_memory` (process-wide). Nothing is done
    on a non-CPU device.
    """
    if device.type != "cpu":
        return ""
    notes = []
    if malloc:
        notes.append("malloc keeps freed memory" if retain_freed_memory() else "malloc untouched")
    if cpu_matmul == "onednn" and compiled:
        notes.append("linear layers: inductor's (--compile)")
    elif cpu_matmul == "onednn":
        n = use_onednn_linear(model)
        notes.append(f"{n} linear layers on oneDNN" if n else "oneDNN linear unavailable: aten linear")
    elif not notes:
        return "CPU: plain PyTorch (aten linear layers, system malloc); --cpu_tuning turns on the optional CPU optimisation"
    else:
        notes.append("linear layers: aten (MKL/OpenBLAS)")
    return "CPU tuning: " + "; ".join(notes)
