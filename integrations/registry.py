"""Per-model knowledge: which handler patches which model class, and which pipelines a handler drives.

A handler is an object with ``apply(model, config)``, ``remove(model)``, ``is_applied(model)``, ``set_config(model,
config)`` and a ``pipelines`` tuple of supported pipeline class names. Adding a model (SD3.5, Wan, ...) is one
``register_model`` call in that model's module; nothing here changes.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ModelHandler(Protocol):
    name: str
    pipelines: tuple[str, ...]

    def apply(self, model: torch.nn.Module, config) -> None: ...

    def remove(self, model: torch.nn.Module) -> None: ...

    def is_applied(self, model: torch.nn.Module) -> bool: ...

    def set_config(self, model: torch.nn.Module, config) -> None: ...


_HANDLERS: dict[type, ModelHandler] = {}


def register_model(model_cls: type, handler: ModelHandler) -> None:
    """Register ``handler`` for ``model_cls`` (exact class; subclasses are looked up through the MRO)."""
    _HANDLERS[model_cls] = handler


def supported_models() -> list[str]:
    return sorted(cls.__name__ for cls in _HANDLERS)


def supported_pipelines() -> list[str]:
    return sorted({name for handler in _HANDLERS.values() for name in handler.pipelines})


def handler_for(model: torch.nn.Module) -> ModelHandler:
    """The handler for ``model``'s class, or a ``TypeError`` naming every supported class."""
    for cls in type(model).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise TypeError(
        f"NAG does not support {type(model).__name__} yet; supported models: {', '.join(supported_models())} "
        f"(pipelines: {', '.join(supported_pipelines())})"
    )
