"""The weights of an evaluate-only run (--eval in detection and segmentation): a trained checkpoint
loaded into the model its stored flags rebuilt. Nothing of a resume happens here: no optimizer,
no position, no run-shaping comparison, no log.txt line copied into the evaluation's folder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from engine import checkpoint as ckpt_util
from engine.state import _misfit as misfit
from errors import CheckpointError


def load_trained_weights(model: nn.Module, path: str, architecture: Sequence[str] = ()) -> dict:
    """Load the ``model`` entry of checkpoint ``path`` into ``model`` (strict); returns the checkpoint.
    A file that does not fit names its first differences and the ``architecture`` flags that shape the
    model (a checkpoint's own are used unless the command line gives others)."""
    path = Path(path)
    ckpt_util.verify(path)
    ckpt = ckpt_util.safe_load(path)
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no model weights (no 'model' state dict)")
    reason = misfit(ckpt, model, None)
    if reason:
        flags = ", ".join(f"--{f}" for f in architecture)
        raise CheckpointError(f"{path} does not fit the model these flags build: {reason}"
                              + (f". The architecture flags ({flags}) come from the checkpoint unless given on "
                                 f"the command line: drop the ones given" if flags else ""))
    model.load_state_dict(weights, strict=True)
    return ckpt
