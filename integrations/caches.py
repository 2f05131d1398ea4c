"""diffusers' caches (``model.enable_cache(config)``, ``diffusers.hooks.apply_*``) on a model NAG is applied to: one
cache state per batch layout (user-facing summary: docs/caches.md).

Calls without NAG are the stock calls, with every cache: nothing is refused at ``apply_nag``, at ``enable_cache`` or
on a plain forward, and a plain forward reads and writes the very state objects diffusers created.

The problem. diffusers' cache hooks keep state per module across the steps of one inference (cached outputs or
residuals, Taylor factors, step counters): ``hook.state`` for PyramidAttentionBroadcast and FasterCache, a
``StateManager`` keyed by the cache context (``"cond"`` / ``"uncond"``) for TaylorSeer, FirstBlockCache, MagCache,
SeaCache and TextKVCache. The pipeline resets it after each call (``maybe_free_model_hooks`` ->
``reset_stateful_hooks``). That state is built for one batch layout. A guided forward (docs/spec.md, "The guided
call") has ``2B`` text rows for ``B`` latent rows (``L + g`` for ``L`` under batched CFG), and in FLUX.1's exact mode
``2B`` image rows in the single blocks; a plain forward (no NAG, NAG off past ``nag_end``, true CFG's unconditional
pass) has ``B``. A tensor kept in one layout and reused in the other has the wrong batch ("Sizes of tensors must
match"), or broadcasts silently at ``B = 1``, and a guided attention output reused in a plain step carries NAG's
combine into a step where NAG is off.

The choice: one state per layout, kept, not reset on a layout change. Reusing a guided output in a later guided
forward is what the cache is for (it already includes NAG's combine); what breaks is mixing layouts. With true CFG the
guided conditional call and the plain unconditional call alternate every step, so resetting at each layout change
would reset at every forward and the cache would never reuse anything; one state per layout is what diffusers
already does per cache context. A layout whose state is first used mid-inference (the plain layout past ``nag_end``)
starts as a new inference does: it computes first, then reuses.

- ``StateManager`` hooks: ``get_state`` (per manager) stores the guided layout's state of context ``name`` under
  ``(name, layout)``, next to diffusers' ``name`` (plain); ``StateManager.reset`` clears both.
- ``hook.state`` hooks: ``hook.state`` becomes a ``_PerLayout`` that forwards attribute access to the stock state
  object in the plain layout and to one state per guided layout otherwise; its ``reset`` resets them all.
- FasterCache's block hook, first called inside ``spatial_attention_timestep_skip_range``, approximates from an empty
  cache and fails (diffusers assumes the first steps lie outside the range), so a state first used after the
  inference has begun is primed to compute on its first call (``_prime_faster_cache_block``). Its approximation
  ``t + (t - t_2) * w`` first keeps the second half of an output whose rows differ from the call's first input (a
  CFG remnant); a guided FLUX.1 double block's text output has ``2B`` rows for ``B`` image rows, so in a guided
  layout it runs on all rows (``_approximate``).

The layout of the forward in progress is per thread (``call_state`` slot ``LAYOUT``): ``apply_nag`` registers
``with_layout(guided.pre_hook)`` as NAG's pre-hook, which reads it from the arguments NAG's pre-hook hands on (text
rows unlike latent rows: ``"nag-<mode>"``, else ``None``). Outside a forward, ``hook.state`` shows the layout of the
thread's last forward; ``layout_states`` shows them all. The cache state itself stays diffusers' per-module state,
shared by every request on the model: two concurrent inferences with a cache on one model mix their states, with or
without NAG (diffusers' design; one model per concurrent request, or no cache, avoids it).

Refused, at the NAG call only (its first guided forward, ``_refuse``): FasterCache with ``is_guidance_distilled=False``.
Its denoiser hook reads the rows of every call as CFG's ``[unconditional; conditional]`` halves: it takes deltas
between the halves of the output and, on skipped steps, cuts the first half off ``hidden_states``,
``encoder_hidden_states``, ``timestep`` and the masks. A guided call's text rows are ``[positive; NAG-negative]``
(``[uncond; cond; NAG-negative]`` under batched CFG): those halves are not CFG's, and the cut call is no call NAG can
read. (Stock diffusers fails with it on FLUX.1 and Wan, which run CFG as separate calls, and on SDXL's UNet.)

Hook order. A cache enabled before ``apply_nag`` on modules whose ``forward`` NAG replaces (FLUX.1's single blocks,
...) would sit inside NAG's forward (fast mode never calls it; exact mode hands it ``2B`` image rows), and a later
``disable_cache`` would unhook NAG's forward with it. ``guard`` re-registers such cache hooks over NAG's forward
(``_hooks_outside``): the order ``enable_cache`` after ``apply_nag`` gives.

Where hooks are found: at ``apply_nag`` (``guard``), after ``enable_cache`` (wrapped while NAG is applied), and at the
first guided forward of each NAG pipeline call (caches installed by ``diffusers.hooks.apply_*`` after ``apply_nag``,
the only way on SDXL's UNet). A model called directly looks once per settings object: call ``apply_nag`` again after
an ``apply_*``. ``remove_nag`` (``unguard``) gives every hook its own state objects back.
"""

from __future__ import annotations

import copy
import functools
import types
import weakref

import torch

from . import call_state, forward_patch
from .guided import as_kwargs, rows, state_of

LAYOUT = "cache_layout"  # call_state slot: None (plain) or "nag-<mode>", for the forward in progress on this thread
_WALKED = "cache_walked"  # call_state slot: the settings object of the call whose hooks were last walked
_GUARD = "_nag_cache_guard"  # model.__dict__: the enable_cache wrapper
_APPROXIMATE = "_compute_approximated_attention_output"

# The hooks _hooks_outside may re-register (their initialize_hook only reads metadata or creates a fresh state).
_CACHE_HOOK_MODULES = {
    f"diffusers.hooks.{name}"
    for name in ("first_block_cache", "mag_cache", "sea_cache", "taylorseer_cache", "pyramid_attention_broadcast",
                 "faster_cache", "text_kv_cache")
}


def _state_manager_cls():
    from diffusers.hooks.hooks import StateManager

    return StateManager


def _faster_cache():
    try:
        from diffusers.hooks import faster_cache
    except ImportError:  # a diffusers without FasterCache
        return None
    return faster_cache


def _registries(model: torch.nn.Module):
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            yield module, registry


def _layout() -> str | None:
    return call_state.peek(LAYOUT)


class _PerLayout:
    """A cache hook's ``state``: the stock state object in the plain layout, one more per guided layout (created on
    first use, like diffusers' ``StateManager`` creates one per context). Attribute access goes to the state of the
    forward in progress on this thread (outside a forward: the layout of this thread's last forward); ``reset``
    resets them all."""

    __slots__ = ("_nag_guided", "_nag_plain", "_nag_prime")

    def __init__(self, plain, prime=None):
        object.__setattr__(self, "_nag_plain", plain)
        object.__setattr__(self, "_nag_guided", {})
        object.__setattr__(self, "_nag_prime", prime)

    def _nag_all(self) -> list:
        return [self._nag_plain, *self._nag_guided.values()]

    def _nag_current(self):
        layout = _layout()
        if layout is None:
            state = self._nag_plain
        else:
            state = self._nag_guided.get(layout)
            if state is None:
                state = self._nag_guided[layout] = _fresh(self._nag_plain)
        if self._nag_prime is not None:
            self._nag_prime(state, [s for s in self._nag_all() if s is not state])
        return state

    def __getattr__(self, name):
        return getattr(self._nag_current(), name)

    def __setattr__(self, name, value):
        setattr(self._nag_current(), name, value)

    def reset(self, *args, **kwargs):
        self._nag_plain.reset(*args, **kwargs)
        self._nag_guided.clear()

    def __repr__(self):
        return repr(self._nag_current())


def _fresh(state):
    try:
        return type(state)()
    except TypeError:  # a state class that takes arguments: a copy, reset
        fresh = copy.copy(state)
        fresh.reset()
        return fresh


def _prime_faster_cache_block(hook, model):
    """FasterCache's block hook computes at iteration ``0`` only outside its timestep skip range (else it reads its
    still empty cache). A layout's state first used after the inference has begun (the plain layout past
    ``nag_end``; a block fast mode skips in guided forwards) starts at ``block_skip_range``: it computes on its first
    call and keeps the stock period from there. The inference has begun when the denoiser hook has counted a
    forward in any layout."""
    model = weakref.ref(model)

    def prime(state, others):
        if state.iteration != 0 or state.cache is not None:
            return
        registry = getattr(model(), "_diffusers_hook", None)
        denoiser = registry.get_hook("faster_cache_denoiser") if registry is not None else None
        states = layout_states(denoiser).values() if denoiser is not None else others
        if any(getattr(other, "iteration", 0) > 0 for other in states):
            state.iteration = hook.block_skip_range

    return prime


def _approximate(self, t_2_output, t_output, weight, batch_size):
    """FasterCache block hook's approximation: in a guided layout (``is_guidance_distilled=True``), on all rows."""
    if _layout() is not None and self.is_guidance_distilled and t_2_output.shape == t_output.shape:
        return t_output + (t_output - t_2_output) * weight
    return getattr(type(self), _APPROXIMATE)(self, t_2_output, t_output, weight, batch_size)


def _keyed_get_state(self):
    """``StateManager.get_state`` with the state of a guided layout under ``(context name, layout)``."""
    name = self.context.name
    layout = _layout()
    key = name if layout is None else (name, layout)
    if key not in self._state_cache:
        self._state_cache[key] = self._state_cls(*self._init_args, **self._init_kwargs)
    return self._state_cache[key]


def _adapt_hook(hook, model) -> None:
    StateManager = _state_manager_cls()
    for value in list(vars(hook).values()):
        if isinstance(value, StateManager) and "get_state" not in value.__dict__:
            value.get_state = types.MethodType(_keyed_get_state, value)
    state = hook.__dict__.get("state")
    if (
        getattr(hook, "_is_stateful", False)
        and state is not None
        and not isinstance(state, (_PerLayout, StateManager))
        and callable(getattr(state, "reset", None))
    ):
        faster_cache = _faster_cache()
        prime = None
        if faster_cache is not None and isinstance(hook, faster_cache.FasterCacheBlockHook):
            prime = _prime_faster_cache_block(hook, model)
            if _APPROXIMATE not in hook.__dict__:
                setattr(hook, _APPROXIMATE, types.MethodType(_approximate, hook))
        hook.state = _PerLayout(state, prime)


def _restore_hook(hook) -> None:
    StateManager = _state_manager_cls()
    for value in list(vars(hook).values()):
        if isinstance(value, StateManager) and getattr(value.__dict__.get("get_state"), "__func__", None) is (
            _keyed_get_state
        ):
            del value.__dict__["get_state"]
            for key in [key for key in value._state_cache if isinstance(key, tuple)]:
                value._state_cache.pop(key).reset()
    state = hook.__dict__.get("state")
    if isinstance(state, _PerLayout):
        hook.state = state._nag_plain
    if getattr(hook.__dict__.get(_APPROXIMATE), "__func__", None) is _approximate:
        del hook.__dict__[_APPROXIMATE]


def adapt(model: torch.nn.Module) -> None:
    """Give every diffusers cache hook on ``model`` one state per batch layout (idempotent)."""
    for _, registry in _registries(model):
        for hook in list(registry.hooks.values()):
            _adapt_hook(hook, model)


def restore(model: torch.nn.Module) -> None:
    """Undo ``adapt``: every hook has its own state objects again, and no guided layout's state."""
    for _, registry in _registries(model):
        for hook in list(registry.hooks.values()):
            _restore_hook(hook)


def layout_states(hook) -> dict:
    """A cache hook's states by layout (``None``: plain, the stock object; ``"nag-exact"`` / ``"nag-fast"``: guided),
    for inspection. ``StateManager`` hooks: the manager's states by key (``name`` or ``(name, layout)``)."""
    StateManager = _state_manager_cls()
    state = hook.__dict__.get("state")
    if isinstance(state, _PerLayout):
        return {None: state._nag_plain, **state._nag_guided}
    for value in vars(hook).values():
        if isinstance(value, StateManager):
            return dict(value._state_cache)
    return {None: state}


def _refuse(model: torch.nn.Module) -> None:
    """At a guided forward: refuse the caches that cannot work with NAG (see the module docstring)."""
    registry = model.__dict__.get("_diffusers_hook")
    hook = registry.get_hook("faster_cache_denoiser") if registry is not None else None
    if hook is not None and not getattr(hook, "is_guidance_distilled", True):
        raise ValueError(
            f"NAG cannot guide this call: {type(model).__name__} has FasterCache with is_guidance_distilled=False, "
            "which treats the rows of every transformer call as classifier-free guidance's [unconditional; "
            "conditional] halves (it takes deltas between the two halves of the output and, on skipped steps, cuts "
            "the first half off the inputs). A NAG call's text rows are the positive rows then the NAG-negative rows "
            "([uncond; cond; NAG-negative] under batched CFG), not CFG halves. Use "
            "FasterCacheConfig(is_guidance_distilled=True) (its attention reuse works with NAG), another cache, or "
            "call without NAG arguments (the stock call)"
        )


def with_layout(pre_hook):
    """``pre_hook`` (``guided.pre_hook``), then the layout of the forward for the cache hooks: ``apply_nag`` registers
    this as the model's one NAG pre-hook, so the layout is read from the arguments NAG's pre-hook hands on (the
    NAG-negative rows already dropped where NAG is off)."""

    @functools.wraps(pre_hook)
    def hook(module, args, kwargs):
        result = pre_hook(module, args, kwargs)
        if result is not None:
            args, kwargs = result
        _set_layout(module, args, kwargs)
        return result

    return hook


def forward_done() -> None:
    """A forward outside a pipeline call is over: no layout until the next forward sets its own, so a hook's state
    read between calls (``enable_cache``, a reset) is the plain layout's. Within a pipeline call the last forward's
    layout holds until the call ends (``call_state.clear_at_call_end``): a step callback reads its states."""
    if call_state.call_config() is None:
        call_state.put(LAYOUT, None)


call_state.clear_at_call_end(LAYOUT)


def _set_layout(module, args, kwargs) -> None:
    state = state_of(module)
    if state is None:
        call_state.put(LAYOUT, None)
        return
    family = state.family
    kw = as_kwargs(state.names, args, kwargs) if args else kwargs
    latents, text = rows(kw.get(family.latents)), rows(kw.get(family.text))
    layout = None
    if latents is not None and text is not None and text != latents:
        layout = "nag-" + (call_state.call_config() or state.config).mode
    call_state.put(LAYOUT, layout)
    if layout is not None and not torch.compiler.is_compiling():
        _guided_forward(module, state)


@torch.compiler.disable
def _guided_forward(model, state) -> None:
    _refuse(model)
    settings = call_state.call_config() or state.config  # a new object per pipeline call
    if call_state.peek(_WALKED) is not settings:
        adapt(model)  # caches installed by diffusers.hooks.apply_* since
        call_state.put(_WALKED, settings)


def _is_registry_top(forward, registry) -> bool:
    """Whether ``forward`` is the one diffusers' ``HookRegistry.register_hook`` set for the registry's last hook."""
    if not registry._fn_refs:
        return False
    cells = getattr(getattr(forward, "func", None), "__closure__", None) or ()
    return any(cell.cell_contents is registry._fn_refs[-1] for cell in cells)


def _hooks_outside(model: torch.nn.Module) -> None:
    """Re-register the cache hooks that NAG's patched ``forward`` wraps (a cache enabled before ``apply_nag``) over
    it, the order an ``enable_cache`` after ``apply_nag`` gives (see the module docstring)."""
    for module, registry in list(_registries(model)):
        ours = module.__dict__.get("forward")
        if not (forward_patch.is_patched(module) and isinstance(ours, types.MethodType) and ours.__self__ is module):
            continue  # NAG does not patch its forward, or something else (diffusers' hooks) is outermost already
        names = list(getattr(registry, "_hook_order", ()))
        hooks = [registry.hooks[name] for name in names]
        previous = module.__dict__[forward_patch.PREVIOUS]
        if not hooks or not _is_registry_top(previous, registry):
            continue
        if any(type(hook).__module__ not in _CACHE_HOOK_MODULES for hook in hooks):
            continue  # not only caches (group offloading, ...): left as it is
        module.__dict__["forward"] = previous  # diffusers' chain outermost again, without NAG's forward
        for name in reversed(names):
            registry.remove_hook(name, recurse=False)
        below = module.__dict__.pop("forward", None)  # what diffusers' first hook wrapped
        module.__dict__[forward_patch.PREVIOUS] = below if below is not None else types.MethodType(
            type(module).forward, module
        )
        module.__dict__["forward"] = ours
        for name, hook in zip(names, hooks):
            registry.register_hook(hook, name)
    root = model.__dict__.get("_diffusers_hook")
    if root is not None and hasattr(root, "invalidate_child_registries_cache"):
        root.invalidate_child_registries_cache()


def guard(model: torch.nn.Module) -> None:
    """Make ``model``'s diffusers caches keep one state per batch layout, now and after ``model.enable_cache``, until
    ``unguard`` (called by ``apply_nag`` after patching, on every apply; the layout of each forward comes from NAG's
    pre-hook, ``with_layout``)."""
    _hooks_outside(model)
    adapt(model)
    if _GUARD in model.__dict__ or not hasattr(model, "enable_cache"):
        return

    def enable_cache(config):
        result = type(model).enable_cache(model, config)
        adapt(model)
        return result

    model.__dict__[_GUARD] = model.enable_cache = enable_cache


def unguard(model: torch.nn.Module) -> None:
    """Undo ``guard``: ``enable_cache`` is the class's again and every hook has its own state objects."""
    wrapper = model.__dict__.pop(_GUARD, None)
    if wrapper is not None and model.__dict__.get("enable_cache") is wrapper:
        del model.__dict__["enable_cache"]
    restore(model)
