"""Replace a module's ``forward`` with one function shared by every patched module, so regional compilation works.

diffusers' ``HookRegistry`` wraps each module's ``forward`` in its own ``functools.partial``. Dynamo guards a patched
``forward`` by identity, so under regional compilation (``module.compile()`` on each repeated block, diffusers'
``compile_repeated_blocks``) every block recompiled once, and past ``torch._dynamo.config.recompile_limit`` (8) the
remaining blocks silently ran eagerly (FLUX.1 has 19 double and 38 single blocks). A ``forward`` that is a bound method of one shared
function is guarded on that function (``__func__``), which all blocks share, and per-module settings stored as plain
attributes are guarded by value, so identical blocks reuse one graph.

A module keeps whatever ``forward`` it had before (another library's wrapper, or the class's own, bound) in
``PREVIOUS`` and the shared function calls it through ``call_previous``. ``unpatch`` restores it when ours is still
the outermost ``forward``; if something wrapped the module after us, ours stays in that chain and must be a
pass-through when NAG is off (NAG's are: they act only on a guided forward's shapes and record).
"""

from __future__ import annotations

import inspect
import types
from typing import Callable

import torch

PREVIOUS = "_nag_previous_forward"


def is_patched(module: torch.nn.Module) -> bool:
    """Whether ``patch`` has put a function into ``module``'s forward chain (and ``unpatch`` could not take it out)."""
    return PREVIOUS in module.__dict__


def patch(module: torch.nn.Module, fn: Callable, **settings) -> None:
    """Make ``fn`` (called as ``fn(module, *args, **kwargs)``) the ``forward`` of ``module``.

    ``settings`` become attributes of ``module`` for ``fn`` to read (keep them to strings, numbers and tuples of
    those: the compiler guards them by value). Patching a module again only updates its settings.
    """
    for name, value in settings.items():
        setattr(module, name, value)
    if is_patched(module):
        return
    previous = module.__dict__.get("forward")  # another library's wrapper, or None: the class's own forward
    module.__dict__[PREVIOUS] = previous if previous is not None else types.MethodType(type(module).forward, module)
    module.forward = types.MethodType(fn, module)


def call_previous(module: torch.nn.Module, *args, **kwargs):
    """The ``forward`` that ``module`` had before ``patch`` (a bound method or another library's wrapper; calling
    ``type(module).forward`` here instead would not trace under torch.compile)."""
    return module.__dict__[PREVIOUS](*args, **kwargs)


def unpatch(module: torch.nn.Module, fn: Callable, settings: tuple[str, ...] = ()) -> bool:
    """Undo ``patch(module, fn, ...)``; returns False (and leaves ``fn`` in place) when a later wrapper is on top."""
    current = module.__dict__.get("forward")
    if not (isinstance(current, types.MethodType) and current.__func__ is fn and current.__self__ is module):
        return False
    previous = module.__dict__.pop(PREVIOUS)
    if getattr(previous, "__func__", None) is type(module).forward and getattr(previous, "__self__", None) is module:
        del module.__dict__["forward"]  # the class's own forward: the module is as it was
    else:
        module.forward = previous
    for name in settings:
        module.__dict__.pop(name, None)
    return True


def parameter_names(fn) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(fn).parameters if name != "self")


def patch_forward(module: torch.nn.Module, fn: Callable, patched: list, **settings) -> tuple[str, ...]:
    """``patch`` that also records the parameter names of the ``forward`` that ``fn`` will call (attribute
    ``_nag_names``, for ``fn`` to read positional arguments by name) and appends ``(module, fn)`` to ``patched``;
    returns the names of the attributes it set (for ``unpatch``)."""
    if not is_patched(module):  # else ours is still in its chain, with its names (see unpatch)
        settings["_nag_names"] = parameter_names(module.forward)
    patch(module, fn, **settings)
    patched.append((module, fn))
    return ("_nag_names", *(name for name in settings if name != "_nag_names"))
