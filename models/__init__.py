"""Models of the framework; ``create_model(name, **kwargs)`` builds any of them by name, and every
model says what it is through its ``contract`` (models.contract)."""
# importing the model files registers their factories
from . import greenmim, hiera_mae, mae, mixmim, pvt, simmim, swin, swin_timm, vit  # noqa: F401
from .contract import ClassifierContract, PretrainContract, PretrainOutput
from .portable import load_exported, save_exported
from .registry import (Variant, classifier_for, create_model, describe, describe_class, is_model, list_models,
                       pretrain_only_prefixes, pretraining_models_for, register)

__all__ = ["ClassifierContract", "PretrainContract", "PretrainOutput", "classifier_for", "create_model", "describe", "is_model",
           "list_models", "load_exported", "pretrain_only_prefixes", "pretraining_models_for", "register", "save_exported", "Variant",
           "describe_class"]
