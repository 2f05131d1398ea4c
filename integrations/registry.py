"""Which family patches which model class, and which pipelines each family drives.

Adding a model family is one ``register_family`` call in that family's module (and its import in ``__init__.py``);
nothing here changes. Unknown classes get a ``TypeError`` naming every supported one.
"""

from __future__ import annotations

import torch

from .family import Family

_FAMILIES: dict[type, Family] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_family(family: Family) -> None:
    """Register ``family`` for each of its model classes (exact classes; subclasses are found through the MRO)."""
    for model_cls in family.models:
        _FAMILIES[model_cls] = family


def register_unavailable(family: str, reason: str) -> None:
    """Record that ``family`` (a name, e.g. ``"Wan 2.1 / 2.2"``) could not be loaded on this diffusers, and why."""
    _UNAVAILABLE[family] = reason


def unavailable() -> dict[str, str]:
    """Families this diffusers release cannot serve (name -> the import error), for error messages and docs."""
    return dict(_UNAVAILABLE)


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
    missing = "".join(f"; {name} needs a newer diffusers ({why})" for name, why in _UNAVAILABLE.items())
    raise TypeError(
        f"NAG does not support {type(model).__name__} yet; supported models: {', '.join(supported_models())} "
        f"(pipelines: {', '.join(supported_pipelines())}){missing}"
    )


def family_for_pipeline(name: str) -> Family | None:
    for family in families():
        if name in family.pipelines:
            return family
    return None

