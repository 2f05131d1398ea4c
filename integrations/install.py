"""Patching a model from its family's declaration, and undoing it exactly.

``install(family, model)`` wraps the stock processor of every attention module of the family's ``processors``
classes, gives the declared modules their shared forwards (``ForwardPatch``) and methods (``MethodPatch``), and runs
the family's own ``patch`` if it has one; it returns an ``Installed`` record, and ``uninstall`` undoes all of it in
reverse order. A failure half-way undoes what that call did before re-raising, so a refused install leaves nothing
behind.

Installing on a model that is already patched only adds what is missing (stock processors set since, e.g. by a
diffusers loader) and touches nothing in place: other requests may be running forwards on the shared model at that
moment, so NAG's processors and forwards must never be taken out and put back (``Installed.merge``).
``check_processors`` refuses a guided forward when an attention module no longer has NAG's processor.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from . import forward_patch
from .processor import foreign_processor_error, restore_processors, wrap_processors


@dataclasses.dataclass
class Installed:
    """What ``install`` did to one model: the processors it replaced (module name -> processor), the forwards it
    replaced (``(module, fn, setting names)``), the methods it bound (``(module, name, fn)``), the family's own
    ``patch`` result, and the attention modules a guided forward checks (``(name, module, NAG processor class)``)."""

    processors: dict = dataclasses.field(default_factory=dict)
    forwards: list = dataclasses.field(default_factory=list)
    methods: list = dataclasses.field(default_factory=list)
    custom: object = None
    attention: tuple = ()

    def merge(self, more: "Installed") -> None:
        """Add what a later ``install`` on the same model did (it only adds what was missing)."""
        self.processors.update(more.processors)
        known = {(id(module), fn) for module, fn, _ in self.forwards}
        self.forwards += [item for item in more.forwards if (id(item[0]), item[1]) not in known]
        self.methods += more.methods
        if self.custom is None:
            self.custom = more.custom
        self.attention = more.attention


def _targets(spec, model):
    for item in spec.modules(model):
        yield item if isinstance(item, tuple) else (item, {})


def install(family, model: torch.nn.Module) -> Installed:
    done = Installed()
    try:
        for attention_cls, processor_cls in family.processors.items():
            done.processors.update(wrap_processors(model, attention_cls, processor_cls))
        for spec in family.forward_patches:
            for module, settings in _targets(spec, model):
                names = forward_patch.patch_forward(module, spec.fn, [], **settings)
                done.forwards.append((module, spec.fn, names))
        for spec in family.method_patches:
            for module in spec.modules(model):
                if spec.name not in module.__dict__:
                    module.__dict__[spec.name] = types.MethodType(spec.fn, module)
                    done.methods.append((module, spec.name, spec.fn))
        if family.patch is not None and not getattr(model, "_nag_state", None):
            done.custom = family.patch(model)
        done.attention = tuple(
            (name, module, processor_cls)
            for attention_cls, processor_cls in family.processors.items()
            for name, module in model.named_modules()
            if isinstance(module, attention_cls)
            and (family.guided_attention is None or family.guided_attention(name, module))
        )
    except BaseException:
        uninstall(family, model, done, everything=False)
        raise
    return done


def uninstall(family, model: torch.nn.Module, done: Installed, everything: bool = True) -> None:
    """Undo ``done``. ``everything``: also unwrap NAG processors ``done`` does not list (ones a diffusers loader
    built after ``apply_nag``); else only the processors ``done`` replaced (undoing one failed ``install``)."""
    if family.restore is not None and done.custom is not None:
        family.restore(model, done.custom)
    for module, name, fn in reversed(done.methods):
        if getattr(module.__dict__.get(name), "__func__", None) is fn:
            del module.__dict__[name]
    for module, fn, names in reversed(done.forwards):
        # False when another library wrapped the module after apply_nag: ours then stays inside its chain as a
        # pass-through (it acts only on a guided forward), and a later apply_nag reuses it.
        forward_patch.unpatch(module, fn, names)
    for attention_cls, processor_cls in family.processors.items():
        restore_processors(model, attention_cls, processor_cls, done.processors, only_replaced=not everything)


def check_processors(family, model: torch.nn.Module) -> None:
    """Refuse a guided forward when an attention module's processor is not NAG's (an IP-Adapter's, a custom one, or
    a stock one set after ``apply_nag``), naming it and the way out."""
    state = getattr(model, "_nag_state", None)
    for name, module, processor_cls in state.installed.attention if state is not None else ():
        if not isinstance(module.processor, processor_cls):
            raise foreign_processor_error(name, module.processor)
