"""Weights that travel: one folder, ``model.safetensors`` (no pickle) + ``config.json``.

``config.json`` names the registered model and the keywords that rebuild it, so
``load_exported(folder)`` needs nothing but this package (installed as ``ummae_models``, see
pyproject.toml); it loads with ``strict=True``. Where timm has the same network
(models.checkpoint_maps.TIMM_EXPORTS), the keys are timm's and ``config.json["timm"]`` holds the
call that builds it in timm::

    cfg = json.load(open(f"{folder}/config.json"))["timm"]
    timm.create_model(cfg["name"], pretrained=True, num_classes=cfg["num_classes"], **cfg["kwargs"],
                      pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors",
                                                  num_classes=cfg["num_classes"]))

(with ``num_classes`` the same on both sides, timm loads strictly).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .registry import create_model, is_model, list_models

FORMAT = "ummae-models/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_exported(model: nn.Module, name: str, folder: str | os.PathLike, kwargs: Optional[dict] = None,
                  extra: Optional[dict] = None) -> Path:
    """Write ``model`` (built as ``create_model(name, **kwargs)``) to ``folder``; returns the folder.

    ``extra`` goes into config.json as it is (provenance, the load report, a timm section)."""
    from safetensors.torch import save_file
    if not is_model(name):
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors sharing storage (views): each tensor gets its own contiguous copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": name, "kwargs": dict(kwargs or {}), "num_tensors": len(tensors),
            "parameters": int(sum(t.numel() for t in tensors.values())), **(extra or {})}
    _write_atomic(out / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": FORMAT, "model": name}))
    _write_atomic(out / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an exported folder (ValueError when it is not one)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not an exported model folder: it has no {CONFIG}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), str):
        raise ValueError(f"{path} is not an export of this package (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta


def load_exported(folder: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides) -> nn.Module:
    """Rebuild an exported model and load its weights strictly; ``overrides`` change build keywords
    that do not change the weights (e.g. ``drop_path_rate``). Returned in eval mode."""
    from safetensors.torch import load_file
    meta = read_config(folder)
    model = create_model(meta["model"], **{**meta["kwargs"], **overrides})
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS), device=str(map_location)), strict=True)
    return model.to(map_location).eval()
