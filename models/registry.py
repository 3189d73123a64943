"""One registry for every model of the framework: ``create_model(name, **kwargs)``.

Each model family's file ends with a literal table of its variants, name -> ``Variant`` (the
constructor keywords, a line of documentation and, for a pretraining model, the registered
classifier its checkpoints finetune into), and one line that registers it:

    VARIANTS = {
        "mae_swin_tiny_256": Variant(dict(SWIN_SIZES["tiny"], decoder_depth=2), "UM-MAE Swin-T, 256 px.",
                                     classifier="swin_tiny_256"),
        ...
    }
    register(MaskedAutoencoderSwin, VARIANTS)

The task follows from the class: a ``PretrainModel`` is trained by main_pretrain.py, a
``Classifier`` by main_finetune.py (models.contract).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .contract import Classifier, PretrainModel


@dataclass(frozen=True)
class Variant:
    """One registered name: its constructor keywords, what it is, and (pretraining) its classifier."""
    kwargs: dict = field(compare=False)
    doc: str
    classifier: Optional[str] = None


@dataclass(frozen=True)
class _Entry:
    cls: type
    variant: Variant
    task: str


_MODELS: dict[str, _Entry] = {}


def register(cls: type, variants: dict[str, Variant]) -> None:
    """The one way to register models: each name of ``variants`` builds ``cls(**variant.kwargs, **kwargs)``."""
    task = "pretrain" if issubclass(cls, PretrainModel) else "classify" if issubclass(cls, Classifier) else None
    if task is None:
        raise TypeError(f"{cls.__name__} is neither a PretrainModel nor a Classifier (models.contract)")
    for name, variant in variants.items():
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        if (task == "pretrain") != (variant.classifier is not None):
            raise ValueError(f"model {name!r}: a pretraining model names its classifier, a classifier none")
        _MODELS[name] = _Entry(cls, variant, task)


def list_models(pattern: str = "*", task: Optional[str] = None) -> list[str]:
    return sorted(n for n, e in _MODELS.items() if fnmatch.fnmatch(n, pattern) and (task is None or e.task == task))


def classifier_for(name: str) -> str:
    """The registered classifier a pretraining model's checkpoint finetunes into."""
    return _MODELS[name].variant.classifier


def pretraining_models_for(classifier: str) -> list[str]:
    """The registered pretraining models whose checkpoints finetune into ``classifier`` (the inverse of
    ``classifier_for``)."""
    return sorted(n for n, e in _MODELS.items() if e.task == "pretrain" and e.variant.classifier == classifier)


def is_model(name: str) -> bool:
    return name in _MODELS


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _MODELS[name]


def describe_class(name: str) -> type:
    """The class a name builds: what its contract says before any instance exists (e.g. ``build_options``)."""
    return _entry(name).cls


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    entry = _entry(name)
    model = entry.cls(**{**entry.variant.kwargs, **kwargs})
    if entry.variant.classifier is not None:
        model.classifier_name = entry.variant.classifier
    return model


def pretrain_only_prefixes() -> tuple[str, ...]:
    """Parameter-name prefixes that only a pretraining model has (each method's ``pretrain_only``): what a
    classifier drops when it loads a pretraining checkpoint, whichever method wrote it."""
    found = {p for e in _MODELS.values() if e.task == "pretrain" for p in e.cls.pretrain_only}
    return tuple(sorted(found))


def describe(name: str, **kwargs):
    """A model's contract (models.contract) without its weights: built on the meta device."""
    with torch.device("meta"):
        return create_model(name, **kwargs).contract
