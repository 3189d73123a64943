"""Input channels of a model's weights: adapting an RGB patch embedding to another channel count.

An RGB-pretrained checkpoint (ImageNet weights, a 3-channel pretraining run) loaded into a model
built with ``in_chans`` N != 3 gets its first convolution's weight adapted by timm's
``adapt_input_conv`` (one channel: the RGB kernels summed; N channels: the RGB kernels repeated
over the N inputs and scaled by 3 / N, so that an input whose channels are equal gives the RGB
response). Weights of another channel count than 3 are not guessed at: refused.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


class ChannelCountError(ValueError):
    """Weights of another channel count than the model's that cannot be adapted (the loader reports it
    as a checkpoint error)."""


def first_conv_key(model: nn.Module) -> Optional[str]:
    """The state-dict key of the model's first convolution's weight (its patch embedding), if any."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def adapt_input_channels(model: nn.Module, state_dict: dict, path: str) -> str:
    """Adapt ``state_dict``'s patch-embedding weight (in place) to the model's input channels when it
    has 3 and the model another count; returns what was done ("" when nothing). Any other pair of
    channel counts is a ChannelCountError naming both."""
    key = first_conv_key(model)
    if key is None or key not in state_dict:
        return ""
    weight = state_dict[key]
    own = model.state_dict()[key]
    if weight.dim() != 4 or weight.shape[1] == own.shape[1] or weight.shape[0] != own.shape[0]:
        return ""
    have, want = int(weight.shape[1]), int(own.shape[1])
    if have != 3:
        raise ChannelCountError(f"{path} was trained on {have}-channel images and the model takes {want}: build it "
                              f"with --in_chans {have} (only RGB weights are adapted to another channel count)")
    from timm.models import adapt_input_conv
    state_dict[key] = adapt_input_conv(want, weight.float()).to(weight.dtype)
    return f"{key} adapted from 3 to {want} channels (timm adapt_input_conv)"
