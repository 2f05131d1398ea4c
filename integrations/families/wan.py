"""NAG for Wan 2.1 / 2.2 (``WanTransformer3DModel``, ``WanVACETransformer3DModel``): docs/families/wan.md.

A guided forward has ``B`` video rows and ``2B`` text rows (positive, then NAG-negative); the timestep (1-D, or Wan
2.2 TI2V's 2-D per-token form) stays at ``B``. Nothing in the model but the cross-attention reads the text batch,
so the stock forward runs unchanged: the text embedder projects ``2B`` rows, every block runs ``attn1``, the FFN and
the modulation at ``B`` rows, and ``NAGWanAttnProcessor`` in each cross-attention ``attn2`` computes the video queries
once, text K/V for ``2B`` rows, one attention per branch and the combine before ``to_out``
(``cross_attention.guided_cross_attention``). Wan 2.1 I2V's image context (CLIP tokens, ``add_k_proj``) is given at
``B`` rows and expanded to ``2B`` (``WanFamily.deliver``) only so that the stock forward can join it to the text;
the processor attends to its first ``B`` rows once and adds that output to the combined text output, as the authors
do. The first-last-frame model (FLF2V, the image embedder's ``pos_embed`` set) takes two image-context rows per
sample (first and last frame, joined to one row by the embedder): ``WanFamily`` counts the image context per sample,
so that ``2B`` rows there are ``B`` samples, not an already doubled context.

The model's forward does not pass its attention kwargs to the blocks, so the record reaches the processors per
thread (``call_state.record()``, ``Family.passes_attention_kwargs``). Wan 2.2 A14B pipelines hold two experts (``transformer``, ``transformer_2``): both
are patched and guided; the pipeline's ``boundary_ratio`` picks the expert per step as usual.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTransformer3DModel,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from .. import call_state, cross_attention
from ..family import Family
from ..guided import rows
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..versions import optional

WanVACETransformer3DModel = optional("diffusers.models.transformers.transformer_wan_vace", "WanVACETransformer3DModel")

TEXT_LEN = 512  # the stock processor's text context length: the image context is the rest of the sequence

PIPELINES = {
    "WanPipeline": {},
    "WanImageToVideoPipeline": {},
    "WanVideoToVideoPipeline": {},
    "WanVACEPipeline": {},
}

DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}


class NAGWanAttnProcessor(NAGProcessor):
    """``WanAttnProcessor`` with NAG in cross-attention: a call with ``2B`` text rows for ``B`` video rows and a
    record (``call_state.record()``, set by the model's pre-hook) is guided; any other call goes to the wrapped
    stock processor."""

    stock = WanAttnProcessor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        nag = call_state.record()
        if not cross_attention.is_guided_call(nag, hidden_states, encoder_hidden_states):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        rows = hidden_states.shape[0]  # B video rows; encoder_hidden_states [2B, (257 +) 512, C]
        image_context = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - TEXT_LEN
            image_context = encoder_hidden_states[:rows, :image_len]  # the positive half (both halves are equal)
            encoder_hidden_states = encoder_hidden_states[:, image_len:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = cross_attention.guided_cross_attention(self.attend_local, query, key, value, nag, attention_mask,
                                                     attention_mask)
        if image_context is not None:  # the I2V image context: once, unguided, added after the combine
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            out = out + self.attend_local(query, key_img, value_img.unflatten(2, (attn.heads, -1)))
        return attn.to_out[1](attn.to_out[0](out))


IMAGE = "encoder_hidden_states_image"


def image_rows_per_sample(model) -> int:
    """Image-context rows per sample: 2 on the first-last-frame model (its image embedder joins the first and the
    last frame's rows into one, ``WanImageEmbedding.pos_embed``), else 1."""
    embedder = getattr(getattr(model, "condition_embedder", None), "image_embedder", None)
    return 2 if getattr(embedder, "pos_embed", None) is not None else 1


class WanFamily(Family):
    """Wan's family: the I2V image context (``encoder_hidden_states_image``) counted per sample. A guided forward
    takes it with ``k * B`` rows (``k = image_rows_per_sample``: the stock layout) or ``2 * k * B`` (both branches,
    equal halves); the stock forward joins the embedded context to every text row, so a forward where NAG acts gets it
    doubled (``deliver``) and one where NAG is off gets the ``k * B`` rows."""

    def check_guided(self, model, kw: dict, batch: int) -> None:
        super().check_guided(model, kw, batch)
        image = kw.get(IMAGE)
        if image is None:
            return
        per_sample = image_rows_per_sample(model)
        n = rows(image)
        if n == 2 * per_sample * batch:
            kw[IMAGE] = image[: per_sample * batch]  # the positive half: the branches share the image context
        elif n != per_sample * batch:
            kind = " (first and last frame)" if per_sample == 2 else ""
            raise ValueError(
                f"{IMAGE} must have {per_sample} row(s) per sample{kind}: {per_sample * batch} for {batch} samples, "
                f"or {2 * per_sample * batch} for both branches; got {n}"
            )

    def deliver(self, kw: dict, extra: dict, record) -> None:
        if kw.get(IMAGE) is not None:
            kw[IMAGE] = torch.cat([kw[IMAGE], kw[IMAGE]])  # one image context per text row
        super().deliver(kw, extra, record)


def _check(model, kw: dict, batch: int) -> None:
    text = kw["encoder_hidden_states"]
    width = model.config.text_dim
    if text.shape[-1] != width:
        raise ValueError(f"encoder_hidden_states must have width text_dim={width}, got {text.shape[-1]}")
    image = kw.get("encoder_hidden_states_image")
    if model.config.image_dim is not None and image is None:
        raise ValueError("encoder_hidden_states_image is required by this I2V model (image_dim is set)")


WAN = WanFamily(
    name="Wan 2.1 / 2.2",


    modular=ModularSpec(


        model_names=("wan", "wan-vace", "wan-i2v"),


        outputs={0: "prompt_embeds"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states"},


        unconditional=True,


    ),
    models=tuple(m for m in (WanTransformer3DModel, WanVACETransformer3DModel) if m is not None),
    token_order="cross_attention",
    acts_in="the text cross-attention attn2 of every block (the I2V image context unguided)",
    processors={WanAttention: NAGWanAttnProcessor},
    guided_attention=lambda name, module: module.is_cross_attention,
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device", "num_videos_per_prompt", "max_sequence_length", "dtype"),
        per_image_arg="num_videos_per_prompt",
        negative_kwargs=(("do_classifier_free_guidance", False),),  # the NAG negative needs no CFG negative
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    guided_models=("transformer", "transformer_2"),
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    check=_check,
    timestep_value=torch.amax,  # TI2V's per-token timesteps: the noise level of the noisiest token
)
register_family(WAN)
