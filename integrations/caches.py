"""Which of diffusers' caches (``model.enable_cache(config)``, ``diffusers.hooks``) NAG works with, and the refusal of
the others: by ``apply_nag`` when one is on, and by ``enable_cache`` while NAG is applied (``guard``).

Works (tests/test_caches_flux.py: a configuration that never skips gives exactly NAG's result without the cache; a
skipping one runs through ``nag_end`` switching, batch 2 and true CFG and stays finite):

- ``FirstBlockCacheConfig``, ``MagCacheConfig``, ``SeaCacheConfig``: they skip whole transformer calls' block stacks
  by residuals of the first block, keyed by the call's cache context ("cond"/"uncond"); a guided call and an
  unguided one both return ``B`` image rows.
- ``TextKVCacheConfig``: it hooks NucleusMoE-Image blocks only; on the models NAG patches it changes nothing.

Refused (``REFUSED``: the reason is in the error):

- ``TaylorSeerCacheConfig``, ``PyramidAttentionBroadcastConfig``: they keep per-block (per-attention) outputs across
  steps; a NAG call's text stream (and exact mode's single-block stream) has ``2B`` rows, an unguided call (past
  ``nag_end``, ``nag_scale=1``) ``B``, so a reused tensor has the wrong batch ("Sizes of tensors must match"), and a
  reused attention output would bypass NAG's combine.
- ``FasterCacheConfig``: it treats the rows of a call as CFG's unconditional and conditional halves and
  approximates one from the other; NAG's ``2B`` text rows are positive and NAG-negative rows, not CFG halves.
"""

from __future__ import annotations

import torch

WORKS = ("FirstBlockCache", "MagCache", "SeaCache", "TextKVCache")

_BATCH = (
    "it keeps per-block outputs across denoising steps, and a NAG call has 2B text rows where an unguided call (past "
    "nag_end, or nag_scale=1) has B, so a reused tensor has the wrong batch, and a reused attention output would "
    "skip NAG's combine"
)
# config class name -> (cache name, why NAG refuses it)
REFUSED = {
    "TaylorSeerCacheConfig": ("TaylorSeerCache", _BATCH),
    "PyramidAttentionBroadcastConfig": ("PyramidAttentionBroadcast", _BATCH),
    "FasterCacheConfig": (
        "FasterCache",
        "it splits a call's rows into CFG's unconditional and conditional halves and approximates one from the other; "
        "NAG's text rows are positive and NAG-negative rows, not CFG halves",
    ),
}
# diffusers hook name -> config class name (caches installed with diffusers.hooks.apply_* instead of enable_cache)
_HOOKS = {
    "taylorseer_cache": "TaylorSeerCacheConfig",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
    "faster_cache_denoiser": "FasterCacheConfig",
    "faster_cache_block": "FasterCacheConfig",
}
_GUARD = "_nag_cache_guard"


def _message(config_name: str, model: torch.nn.Module, who: str) -> str:
    cache, reason = REFUSED[config_name]
    return (
        f"{who}: NAG does not work with {cache} ({config_name}) on {type(model).__name__}: {reason}. Caches that work "
        f"with NAG: {', '.join(WORKS)}. Use one of those, or call model.disable_cache() / remove_nag first"
    )


def check_config(model: torch.nn.Module, config, who: str) -> None:
    """Raise ``ValueError`` when ``config`` (a diffusers cache config) is one NAG refuses."""
    name = type(config).__name__
    if name in REFUSED:
        raise ValueError(_message(name, model, who))


def check_model(model: torch.nn.Module, who: str = "apply_nag") -> None:
    """Raise ``ValueError`` when ``model`` has a cache NAG refuses (through ``enable_cache`` or an ``apply_*``)."""
    config = getattr(model, "_cache_config", None)
    if config is not None:
        check_config(model, config, who)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook, config_name in _HOOKS.items():
            if registry.get_hook(hook) is not None:
                raise ValueError(_message(config_name, model, who))


def guard(model: torch.nn.Module) -> None:
    """Refuse the caches NAG does not work with, now and through ``model.enable_cache`` until ``unguard``."""
    check_model(model)
    if not hasattr(model, "enable_cache") or _GUARD in model.__dict__:
        return

    def enable_cache(config):
        check_config(model, config, f"{type(model).__name__}.enable_cache (NAG is applied)")
        return type(model).enable_cache(model, config)

    model.__dict__[_GUARD] = enable_cache
    model.enable_cache = enable_cache


def unguard(model: torch.nn.Module) -> None:
    """Undo ``guard``: ``enable_cache`` is the class's again."""
    ours = model.__dict__.pop(_GUARD, None)
    if ours is not None and model.__dict__.get("enable_cache") is ours:
        del model.__dict__["enable_cache"]
