"""NAG for ``FluxTransformer2DModel`` (FLUX.1, Kontext, Fill, Control and everything built on it): "exact" mode
(docs/spec.md, "Exact mode on FLUX.1") and "fast" mode ("Fast mode").

How one guided forward runs (``B`` image rows, ``2B`` text rows = positive then NAG-negative; ``guided.pre_hook``
checks the batches, expands ``timestep``/``guidance`` to ``2B`` and passes a ``NAGForward`` record to the processors
through ``joint_attention_kwargs["nag"]``):

- ``modulation.positive_rows_forward`` replaces the ``forward`` of each double block's ``norm1`` and of ``norm_out``: it
  modulates the ``B``-row image stream with the positive rows of the ``2B``-row ``temb``.
- ``NAGFluxAttnProcessor`` wraps each stock ``FluxAttnProcessor``. Double blocks (both modes): image Q/K/V are
  computed once at ``B`` rows and shared by both branches; text queries attend per branch over ``[text_b ; image]``
  (``dispatch_attention_fn``, the user's backend); image queries attend once over the image keys and per branch over
  the text keys, and ``nag_merge`` LSE-merges the parts and NAG-combines the branches before ``to_out`` (back to ``B``
  rows): exactly the attention over ``[text_b ; image]`` (``split_attention.image_attention``). With an attention
  mask, a context-parallel config or a non-PyTorch attention backend, exact mode runs the unsplit per-branch
  attention through ``dispatch_attention_fn`` instead. Exact-mode single blocks: the image part of the attention
  output is combined and written into both halves before the MLP concat and ``proj_out`` (in place, or out of place
  where autograd records the forward).
- ``_single_block_forward`` replaces every single block's ``forward``. Exact mode: the first one tiles the image
  tokens to ``2B``, the last one keeps the positive half. Fast mode: each block runs ``flux_fast.fast_single_block``
  (the image stays at ``B`` rows).
- Both replacements are one shared function per role (``forward_patch``), not per-module wrappers, so regional
  compilation (``compile_repeated_blocks``) compiles each block class once instead of once per block.

Plain forwards (no ``"nag"`` record) go straight to the wrapped stock processor, so they are the stock computation.
Every decision is made on shapes or Python values, except the ``nag_end`` test (one scalar read per call, only when
``nag_end < 1``), so the patched model runs on meta tensors and under ``torch.compile``.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxTransformer2DModel,
    _get_qkv_projections,
)

from nag_kernels.compute import records_grad

from .. import forward_patch, parallel
from ..family import Family, ForwardPatch
from ..guided import NAGForward, as_kwargs
from ..modular_spec import ModularSpec
from ..modulation import positive_rows_forward
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, heads
from .flux_fast import fast_single_block, qkv, rope, split_rope

# Supported pipelines -> the recommended settings that differ from the family's there.
PIPELINES = {
    "FluxPipeline": {},
    "FluxImg2ImgPipeline": {},
    "FluxInpaintPipeline": {},
    "FluxFillPipeline": {},
    "FluxControlPipeline": {},
    "FluxKontextPipeline": {"end": 0.25},  # the authors' Kontext default
}


class NAGFluxAttnProcessor(NAGProcessor):
    """``FluxAttnProcessor`` with NAG: plain calls go to the wrapped stock processor, guided calls (a ``nag`` record
    from the transformer hook) run NAG's attention. Same ``__call__`` signature plus ``nag``."""

    stock = FluxAttnProcessor

    def _can_split(self, attention_mask, nag: NAGForward) -> bool:
        """Whether the image queries may be split (see the module docstring); fast mode requires it."""
        if attention_mask is None and self._parallel_config is None:
            return nag.mode == "fast" or self.backend_is_torch()
        if nag.mode == "fast":
            if attention_mask is None:  # context parallelism: parallel.image_attention runs diffusers' CP templates
                return True
            raise ValueError(
                "mode='fast' supports neither attention masks (the split image attention has no mask path); use "
                "mode='exact'"
            )
        return False

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        nag: NAGForward | None = None,
    ):
        if nag is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            return self._double(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, nag)
        return self._single(attn, hidden_states, attention_mask, image_rotary_emb, nag)

    def _double(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, nag):
        # hidden_states [B, N, C] (image, once), encoder_hidden_states [2B, T, C] (positive then negative text).
        batch, text_len = nag.batch, encoder_hidden_states.shape[1]
        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = heads(attn.head_dim, *projections[:3], attn.norm_q, attn.norm_k)
        txt_q, txt_k, txt_v = heads(attn.head_dim, *projections[3:], attn.norm_added_q, attn.norm_added_k)
        if self._can_split(attention_mask, nag):
            text_rope, image_rope = split_rope(image_rotary_emb, text_len)
            query, key = rope(query, image_rope), rope(key, image_rope)
            txt_q, txt_k = rope(txt_q, text_rope), rope(txt_k, text_rope)
            # Text queries of each branch over [text_b ; image] (image K/V shared), through the user's backend.
            text = self.attend(txt_q, branch_join(txt_k, key), branch_join(txt_v, value))  # [2B, T, C]
            image = parallel.image_attention(  # [B, N, C], merged and combined
                query, key, value, txt_k, txt_v, nag, parallel_config=self._parallel_config,
                group=parallel.tp_group_of(attn),
            )
        else:
            # Both branches see the same image Q/K/V: tile to 2B and join each branch's text in front.
            query = branch_join(txt_q, query)
            key = branch_join(txt_k, key)
            value = branch_join(txt_v, value)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            out = self.attend(query, key, value, attention_mask)  # [2B, T + N, C]
            image = out[:, text_len:]
            image = parallel.combine(image[:batch], image[batch:], nag, parallel.tp_group_of(attn))  # [B, N, C]
            text = out[:, :text_len].contiguous()
        image = attn.to_out[1](attn.to_out[0](image))
        return image, attn.to_add_out(text)

    def single_fast(self, block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, nag):
        """A whole single block in fast mode (``flux_fast.fast_single_block``); returns ``(text [2B], image [B])``."""
        self._can_split(attention_mask, nag)  # raises on a mask
        return fast_single_block(
            block, self.attend, hidden_states, encoder_hidden_states, temb, image_rotary_emb, nag,
            parallel_config=self._parallel_config,
        )

    def _single(self, attn, hidden_states, attention_mask, image_rotary_emb, nag):
        # hidden_states [2B, T + N, C]: text tokens first, image tokens tiled to both halves by _single_block_forward.
        batch, text_len = nag.batch, nag.text_len
        query, key, value = heads(attn.head_dim, *qkv(attn, hidden_states), attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(query, key, value, attention_mask)  # [2B, T + N, C]
        image = out[:, text_len:]
        group = parallel.tp_group_of(attn)
        if records_grad(out):  # autograd records this forward: out of place (the in-place combine is inference-only)
            guided = parallel.combine(image[:batch], image[batch:], nag, group)  # [B, N, C]
            return torch.cat([out[:, :text_len], torch.cat([guided, guided])], dim=1)
        parallel.combine(image[:batch], image[batch:], nag, group, out=image[:batch])  # in place, positive half
        image[batch:].copy_(image[:batch])  # the authors write the guided tokens into both halves
        return out



def _single_block_forward(self, *args, **kwargs):
    """``forward`` of every single block in a guided forward. Exact mode: the first block (the one that receives the
    ``B`` image rows) tiles them to ``2B``, the last one (``self._nag_last``) keeps the positive half. Fast mode: the
    block runs ``flux_fast.fast_single_block`` (the image stays at ``B`` rows)."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    jak = kw.get("joint_attention_kwargs") or {}
    nag = jak.get("nag")
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    if nag.mode == "fast":
        processor = self.attn.processor
        if not isinstance(processor, NAGFluxAttnProcessor):
            raise TypeError(
                f"mode='fast' needs NAG's attention processor in every single block, but one has "
                f"{type(processor).__name__} (set after apply_nag?); call remove_nag and apply_nag again"
            )
        return processor.single_fast(
            self,
            kw["hidden_states"],
            kw["encoder_hidden_states"],
            kw["temb"],
            kw.get("image_rotary_emb"),
            jak.get("attention_mask"),
            nag,
        )
    text_len = kw["encoder_hidden_states"].shape[1]
    if text_len != nag.text_len:  # context parallelism split the text after the pre-hook read its length
        kw["joint_attention_kwargs"] = {**jak, "nag": dataclasses.replace(nag, text_len=text_len)}
    if kw["hidden_states"].shape[0] == nag.batch:  # only the first single block gets the B-row image stream
        kw["hidden_states"] = torch.cat([kw["hidden_states"], kw["hidden_states"]])
    text, image = forward_patch.call_previous(self, **kw)
    if self._nag_last:
        image = image[: nag.batch]
    return text, image


def _norms(model):
    return [*((block.norm1, {"_nag_emb": "emb"}) for block in model.transformer_blocks),
            (model.norm_out, {"_nag_emb": "conditioning_embedding"})]


def _single_blocks(model):
    singles = list(model.single_transformer_blocks)  # every one: fast mode replaces each block's computation
    return [(block, {"_nag_last": index == len(singles) - 1}) for index, block in enumerate(singles)]


def _check(model: FluxTransformer2DModel, kw: dict, batch: int) -> None:
    if kw.get("pooled_projections") is None:
        raise ValueError(f"pooled_projections must have batch {2 * batch} like encoder_hidden_states, got None")


FLUX = Family(
    name="FLUX.1",


    modular=ModularSpec(


        model_names=("flux", "flux-kontext"),


        outputs={0: "prompt_embeds", 1: "pooled_prompt_embeds"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"},


        pipelines={"FluxKontextAutoBlocks": "FluxKontextPipeline"},


        step_rows=True,


    ),
    models=(FluxTransformer2DModel,),
    token_order="text_first",
    acts_in="the joint attention of the double-stream blocks (image outputs) and of the single-stream blocks",
    processors={FluxAttention: NAGFluxAttnProcessor},
    forward_patches=(ForwardPatch(positive_rows_forward, _norms), ForwardPatch(_single_block_forward, _single_blocks)),
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt", "nag_negative_prompt_2": "prompt_2"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_pooled_prompt_embeds": 1},
        per_branch=(0, 1),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    per_branch=("pooled_projections",),
    expand=("timestep", "guidance"),
    timestep_scale=1000.0,
    check=_check,
)
register_family(FLUX)
