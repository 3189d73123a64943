"""Models of the framework; ``create_model(name, **kwargs)`` builds any of them by name."""
# importing the model files registers their factories
from . import greenmim, hiera_mae, mae, mixmim, pvt, simmim, swin, vit  # noqa: F401
from .registry import create_model, is_model, list_models, model_task, register_model, register_pretrain_model

__all__ = ["create_model", "is_model", "list_models", "model_task", "register_model", "register_pretrain_model"]
