"""NAG for LTX-Video (``LTXVideoTransformer3DModel``): docs/families/ltx.md.

A guided forward has ``L`` video rows and ``L + g`` text rows with their ``encoder_attention_mask`` rows: without
CFG ``L = g = B`` (positive, then NAG-negative); LTX pipelines batch CFG (``[uncond B; cond B]`` video rows, text and
mask ``[uncond B; cond B; NAG-negative B]``, ``Family.batched_cfg``) and only the conditional rows are guided. NAG
acts in every block's text cross-attention ``attn2``: the video queries once, K/V for every text row, one attention
per branch with that branch's own mask, the combine before ``to_out``. Self-attention, the FFN and the modulation
run at ``L`` rows.

The stock forward reshapes the projected text with ``.view(batch, -1, C)`` (batch = video rows), which would fold
the extra text rows into the sequence. In a guided forward ``cross_attention.flattened_text_forward`` (the caption projection's
``forward``, one shared function) returns the projected text of all ``L + g`` rows flattened into one sequence and
broadcast (a stride-0 ``expand``, no copy) to the ``L`` video rows, which that ``view`` leaves as it is; the
processor reads the rows back from it. The model's forward does not pass its attention kwargs to the blocks, so
the record reaches the processors per thread (``call_state.record()``, ``Family.passes_attention_kwargs``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import (
    LTXAttention,
    LTXVideoAttnProcessor,
    LTXVideoTransformer3DModel,
)

from .. import call_state, cross_attention
from ..family import Family, ForwardPatch
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family

PIPELINES = {"LTXPipeline": {}, "LTXImageToVideoPipeline": {}, "LTXConditionPipeline": {}}
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}


class NAGLTXAttnProcessor(NAGProcessor):
    """``LTXVideoAttnProcessor`` with NAG in cross-attention: in a guided forward (a record in
    ``call_state.record()``, set by the model's pre-hook) the text arrives flattened by ``cross_attention.flattened_text_forward``."""

    stock = LTXVideoAttnProcessor

    def _attend(self, query, key, value, mask=None):
        return self.attend(query, key, value, mask)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        nag = call_state.record()
        if nag is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        rows = hidden_states.shape[0]
        text = encoder_hidden_states[0].unflatten(0, (-1, nag.text_len))  # [L + g, T, C]
        mask_pos = mask_neg = None
        if attention_mask is not None:  # [L + g, 1, T] bias -> [L + g, heads, 1, T]
            mask = attn.prepare_attention_mask(attention_mask, nag.text_len, text.shape[0])
            mask = mask.view(text.shape[0], attn.heads, -1, mask.shape[-1])
            mask_pos, mask_neg = mask[:rows], mask[rows:]
        query = attn.norm_q(attn.to_q(hidden_states))
        key, value = attn.norm_k(attn.to_k(text)), attn.to_v(text)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = cross_attention.guided_cross_attention(self._attend, query, key, value, nag, mask_pos, mask_neg)
        return attn.to_out[1](attn.to_out[0](out))

def _check(model, kw: dict, batch: int) -> None:
    width = model.config.caption_channels
    if kw["encoder_hidden_states"].shape[-1] != width:
        raise ValueError(
            f"encoder_hidden_states must have width caption_channels={width}, got {kw['encoder_hidden_states'].shape[-1]}")

LTX = Family(
    name="LTX-Video",

    modular=ModularSpec(

        model_names=("ltx",),

        outputs={0: "prompt_embeds", 1: "prompt_attention_mask"},

        guider_inputs={"prompt_embeds": "encoder_hidden_states", "prompt_attention_mask": "encoder_attention_mask"},

        unconditional=True,

    ),
    models=(LTXVideoTransformer3DModel,),
    token_order="cross_attention",
    acts_in="the text cross-attention attn2 of every block, each branch with its own text mask",
    processors={LTXAttention: NAGLTXAttnProcessor},
    forward_patches=(ForwardPatch(cross_attention.flattened_text_forward, lambda model: (model.caption_projection,)),),
    guided_attention=lambda name, module: name.endswith("attn2"),  # the text cross-attention
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_attention_mask": 1},
        per_branch=(0, 1),
        forwarded=("device", "num_videos_per_prompt", "max_sequence_length", "dtype"),
        per_image_arg="num_videos_per_prompt",
        negative_kwargs=(("do_classifier_free_guidance", False),),
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    per_branch=("encoder_attention_mask",),
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    batched_cfg=True,
    check=_check,
    timestep_value=torch.amax,  # LTXConditionPipeline's per-token timesteps: the noisiest token
)
register_family(LTX)
