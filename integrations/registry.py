"""Which family patches which model class, and which pipelines each family drives.

Adding a model family is one ``register_family`` call in that family's module (and its import in ``__init__.py``);
nothing here changes. Unknown classes get a ``TypeError`` naming every supported one.
"""

from __future__ import annotations

import torch

from .family import Family

_FAMILIES: dict[type, Family] = {}


def register_family(family: Family) -> None:
    """Register ``family`` for each of its model classes (exact classes; subclasses are found through the MRO)."""
    for model_cls in family.models:
        _FAMILIES[model_cls] = family


def register_model(model_cls: type, family: Family) -> None:
    """Register ``family`` for one more model class."""
    _FAMILIES[model_cls] = family


def families() -> list[Family]:
    seen: dict[int, Family] = {}
    for family in _FAMILIES.values():
        seen.setdefault(id(family), family)
    return list(seen.values())


def supported_models() -> list[str]:
    return sorted(cls.__name__ for cls in _FAMILIES)


def supported_pipelines() -> list[str]:
    return sorted({name for family in families() for name in family.pipelines})


def family_for(model: torch.nn.Module) -> Family:
    """The family of ``model``'s class, or a ``TypeError`` naming every supported class."""
    for cls in type(model).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    raise TypeError(
        f"NAG does not support {type(model).__name__} yet; supported models: {', '.join(supported_models())} "
        f"(pipelines: {', '.join(supported_pipelines())})"
    )


def family_for_pipeline(name: str) -> Family | None:
    for family in families():
        if name in family.pipelines:
            return family
    return None


handler_for = family_for  # the earlier name
