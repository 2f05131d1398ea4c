"""NAG for SDXL (``UNet2DConditionModel``): docs/families/sdxl.md.

NAG acts in the text cross-attention ``attn2`` of every transformer block. A guided UNet call has ``L`` latent rows
and ``L + g`` text rows: without CFG ``L = g = B`` (positive rows, then NAG-negative rows); with CFG the pipeline
batches ``[uncond B; cond B]`` latents and the text ``[uncond B; cond B; NAG-negative B]`` (``Family.batched_cfg``),
and only the conditional rows are guided. ``added_cond_kwargs`` (pooled text embeddings, time ids) keep their
``L`` rows: the NAG negative changes the cross-attention only, as in the authors' pipeline.

``NAGAttnProcessor`` wraps each stock ``AttnProcessor2_0``; the record arrives through ``cross_attention_kwargs``
(the UNet passes it to every attention module). In a guided cross-attention call it computes the queries once, K/V
for all text rows, one attention per branch (each with its rows of the attention mask) and the combine before
``to_out`` (``cross_attention.guided_cross_attention``). Self-attention and plain calls go to the wrapped processor.
Like the stock ``AttnProcessor2_0`` it calls ``F.scaled_dot_product_attention`` directly (``set_attention_backend``
does not change the stock SDXL attention either).

The UNet's own processor setters keep NAG's processors (``processor_setters``): ``set_default_attn_processor``
(``AttnProcessor``), ``enable_attention_slicing`` (``SlicedAttnProcessor``) and ``fuse_qkv_projections``
(``FusedAttnProcessor2_0``) set stock processors that NAG's wraps. Plain calls run them; a guided cross-attention
runs NAG's unsliced SDPA, through the fused ``to_kv`` when the wrapped processor is the fused one.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
)

from .. import cross_attention
from ..family import Family
from ..guided import NAGForward
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..processor_setters import setter_patches
from ..registry import register_family

PIPELINES = {
    "StableDiffusionXLPipeline": {},
    "StableDiffusionXLImg2ImgPipeline": {},
    "StableDiffusionXLInpaintPipeline": {},
}
DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.5, "end": 1.0, "mode": "exact"}


class NAGAttnProcessor(NAGProcessor):
    """``AttnProcessor2_0`` with NAG in cross-attention; same call signature plus ``nag``."""

    stock = AttnProcessor2_0
    # the stock processors the UNet's setters install: default, set_default_attn_processor, attention slicing, fused
    wraps = (AttnProcessor2_0, AttnProcessor, SlicedAttnProcessor, FusedAttnProcessor2_0)

    @classmethod
    def can_wrap(cls, processor) -> bool:
        return any(isinstance(processor, stock) and type(processor).__call__ is stock.__call__ for stock in cls.wraps)

    @property
    def _attention_backend(self):  # the stock processor has no such attribute until set_attention_backend sets it
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @staticmethod
    def _attend(query, key, value, mask=None):
        # [R, S, H, D] layout in and [R, S, H * D] out, through SDPA as the stock processor
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 nag: NAGForward | None = None, **kwargs):
        if not cross_attention.is_guided_call(nag, hidden_states, encoder_hidden_states):
            if temb is not None:  # as Attention.forward calls it: SlicedAttnProcessor takes no temb
                kwargs["temb"] = temb
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        rows, text_rows, text_len = hidden_states.shape[0], encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
        mask_pos = mask_neg = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, text_len, text_rows)
            mask = mask.view(text_rows, attn.heads, -1, mask.shape[-1])
            mask_pos, mask_neg = mask[:rows], mask[rows:]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if isinstance(self.inner, FusedAttnProcessor2_0) and getattr(attn, "to_kv", None) is not None:
            kv = attn.to_kv(encoder_hidden_states)  # fuse_qkv_projections: K and V in one projection
            key, value = kv.split(kv.shape[-1] // 2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = cross_attention.guided_cross_attention(self._attend, query, key, value, nag, mask_pos, mask_neg)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _check(model, kw: dict, batch: int) -> None:
    width = model.config.cross_attention_dim
    text = kw["encoder_hidden_states"]
    if text.shape[-1] != width:
        raise ValueError(f"encoder_hidden_states must have width cross_attention_dim={width}, got {text.shape[-1]}")


SDXL = Family(
    name="SDXL",


    modular=ModularSpec(


        model_names=("stable-diffusion-xl",),


        outputs={0: "prompt_embeds"},


        guider_inputs={"prompt_embeds": "prompt_embeds"},


    ),
    models=(UNet2DConditionModel,),
    token_order="cross_attention",
    acts_in="the text cross-attention attn2 of every transformer block (pooled text embeddings and time ids stay "
            "positive)",
    processors={Attention: NAGAttnProcessor},
    method_patches=setter_patches(UNet2DConditionModel),
    guided_attention=lambda name, module: module.is_cross_attention,
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt", "nag_negative_prompt_2": "prompt_2"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device", "num_images_per_prompt", "lora_scale", "clip_skip"),
        negative_kwargs=(("do_classifier_free_guidance", False),),  # the NAG negative needs no CFG negative
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    guided_models=("unet",),
    latents="sample",
    attention_kwargs="cross_attention_kwargs",
    modes=("exact",),
    batched_cfg=True,
    check=_check,
)
register_family(SDXL)
