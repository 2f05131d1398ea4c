"""What every cross-attention family (Wan 2.x, SDXL, LTX-Video) shares: the guided cross-attention and the record hand-off.

In a cross-attention layer (docs/spec.md, "Where NAG acts") the queries are the latent tokens, the same in both
branches; only the keys and values come from the positive or the NAG-negative text. A guided call therefore computes
the queries once (``L`` latent rows), the keys and values for all text rows (``L + g``: one per latent row, then the
NAG-negative rows of the last ``g`` latent rows; ``g = L`` unless CFG's rows are batched, ``guided.NAGForward``), one
attention per branch, and the NAG combine before ``to_out``. The latent stream is never duplicated, so a guided
forward costs a plain one plus the text K/V projections and one more attention over the short text sequence.

``guided_cross_attention`` is that computation on projected heads. ``hand_record`` is for models whose top-level
forward does not pass its attention kwargs down to the blocks (Wan, LTX-Video): a second forward pre-hook, run after
``guided.pre_hook``, takes the ``NAGForward`` record out of the attention kwargs and sets it on the NAG processors of
the model's cross-attention modules (attribute ``record``; ``None`` on every other forward).
"""

from __future__ import annotations

import torch

from .guided import NAGForward
from .split_attention import combine

RECORD_HOOK = "_nag_record_hook"
CROSS_MODULES = "_nag_cross_modules"
ON_RECORD = "_nag_on_record"


def guided_cross_attention(attend, query, key, value, nag: NAGForward, mask_pos=None, mask_neg=None) -> torch.Tensor:
    """NAG-combined cross-attention of shared queries over each branch's text.

    Args:
        attend: ``attend(q [R, N, H, D], k, v [R, T, H, D], mask) -> [R, N, H * D]`` (the processor's attention).
        query: ``[L, N, H, D]``, one row per latent row (shared by both branches).
        key, value: ``[L + g, T, H, D]``: the ``L`` rows of the latent rows' own text, then the NAG-negative rows of
            the last ``g = nag.guided_rows`` latent rows.
        nag: the call's record (scale, tau, alpha, norm, backend, guided rows).
        mask_pos, mask_neg: each branch's attention mask (``[L, H, 1, T]`` / ``[g, H, 1, T]``) or ``None``.

    Returns:
        ``[L, N, H * D]`` before ``to_out``: the first ``L - g`` rows plain, the last ``g`` combined (docs/spec.md,
        "The combine").
    """
    rows = query.shape[0]
    guided = nag.guided_rows
    z_pos = attend(query, key[:rows], value[:rows], mask_pos)
    z_neg = attend(query[rows - guided:], key[rows:], value[rows:], mask_neg)
    out = combine(z_pos[rows - guided:], z_neg, nag)
    return out if guided == rows else torch.cat([z_pos[: rows - guided], out])


def is_guided_call(nag, hidden_states, encoder_hidden_states) -> bool:
    """A cross-attention call is guided when it has a record and more text rows than latent rows."""
    return (
        nag is not None
        and encoder_hidden_states is not None
        and encoder_hidden_states.shape[0] > hidden_states.shape[0]
    )


def _hand_record(module, args, kwargs):
    """Forward pre-hook: move ``attention_kwargs["nag"]`` (set by ``guided.pre_hook``) onto the processors."""
    name = module._nag_state.family.attention_kwargs
    extra = kwargs.get(name)
    record = None
    if extra and "nag" in extra:
        extra = dict(extra)
        record = extra.pop("nag")
        kwargs = {**kwargs, name: extra or None}
    for attention in getattr(module, CROSS_MODULES):
        if hasattr(attention.processor, "record"):
            attention.processor.record = record
    on_record = module.__dict__.get(ON_RECORD)
    if on_record is not None:
        on_record(module, record)
    return args, kwargs


def hand_record(model: torch.nn.Module, cross_modules, on_record=None) -> None:
    """Install ``_hand_record`` on ``model`` for its cross-attention modules (``restore_record`` undoes it);
    ``on_record(model, record_or_None)`` is called on every forward after the processors got the record."""
    model.__dict__[CROSS_MODULES] = tuple(cross_modules)
    if on_record is not None:
        model.__dict__[ON_RECORD] = on_record
    model.__dict__[RECORD_HOOK] = model.register_forward_pre_hook(_hand_record, with_kwargs=True)


def restore_record(model: torch.nn.Module) -> None:
    model.__dict__.pop(ON_RECORD, None)
    handle = model.__dict__.pop(RECORD_HOOK, None)
    if handle is not None:
        handle.remove()
    for attention in model.__dict__.pop(CROSS_MODULES, ()):
        if hasattr(attention.processor, "record"):
            attention.processor.record = None


def register_unsupported(name: str, model_cls: type, pipelines: dict, needs: str) -> None:
    """Register ``model_cls`` with a family whose ``apply_nag`` says which newer diffusers it needs (for releases
    that have the model but not the attention API this integration wraps)."""
    from .family import Family
    from .pipeline import PromptAdapter
    from .registry import register_family

    def refuse(model):
        raise RuntimeError(f"NAG on {name} needs a newer diffusers: this release lacks {needs}; pip install -U diffusers")

    register_family(Family(
        name=name, models=(model_cls,), token_order="cross_attention", acts_in="(unsupported on this diffusers)",
        patch=refuse, restore=lambda *a: None, prompts=PromptAdapter(prompts={"nag_negative_prompt": "prompt"},
                                                                     embeds={}),
        pipelines=pipelines,
    ))
