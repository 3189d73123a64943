"""One registry for every model of the framework: ``create_model(name, **kwargs)``.

Each name is tagged with its task: ``"pretrain"`` (masked-image-modeling models,
trained by main_pretrain.py) or ``"classify"`` (classifiers / backbones, trained by
main_finetune.py).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Optional

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}
_CLASSIFIERS: dict[str, str] = {}   # pretraining name -> the classifier its checkpoint finetunes into


def _register(fn: Callable[..., nn.Module], task: str, classifier: Optional[str] = None) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    if (task == "pretrain") != (classifier is not None):
        raise ValueError(f"model {fn.__name__!r}: a pretraining model names its classifier, a classifier none")
    _MODELS[fn.__name__] = fn
    _TASKS[fn.__name__] = task
    if classifier is not None:
        _CLASSIFIERS[fn.__name__] = classifier
    return fn


def register_named(name: str, build: Callable[..., nn.Module], doc: str, task: str = "pretrain",
                   namespace: Optional[dict] = None, classifier: Optional[str] = None) -> Callable[..., nn.Module]:
    """The one way to register a model: ``build(**kwargs)`` under ``name`` for ``task``
    ("pretrain" or "classify"); a pretraining model names the registered ``classifier`` its
    checkpoints finetune into. ``namespace`` (a module's ``globals()``) also binds the factory
    there, so ``module.name(**kwargs)`` works."""
    def factory(**kwargs):
        return build(**kwargs)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    _register(factory, task, classifier)
    if namespace is not None:
        namespace[name] = factory
    return factory


def list_models(pattern: str = "*", task: Optional[str] = None) -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (task is None or _TASKS[n] == task))


def classifier_for(name: str) -> str:
    """The registered classifier a pretraining model's checkpoint finetunes into."""
    return _CLASSIFIERS[name]


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    if name in _CLASSIFIERS:
        model.classifier_name = _CLASSIFIERS[name]
    return model


def describe(name: str, **kwargs):
    """A model's contract (models.contract) without its weights: built on the meta device."""
    import torch
    with torch.device("meta"):
        return create_model(name, **kwargs).contract
