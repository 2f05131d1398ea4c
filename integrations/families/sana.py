"""NAG for Sana, Sana-Sprint and Sana-Video (``SanaTransformer2DModel``, ``SanaControlNetModel``,
``SanaVideoTransformer3DModel``): docs/families/sana.md.

Two families, one module (they share the guided cross-attention and the caption hand-off below):

- **Sana** (``SanaTransformer2DModel``; ``SanaControlNetModel``, guided along with it in ``SanaControlNetPipeline``):
  ``SanaPipeline``, ``SanaControlNetPipeline`` (batched CFG), ``SanaSprintPipeline``, ``SanaSprintImg2ImgPipeline``
  (a guidance embedding, no CFG: NAG is their only negative prompt).
- **Sana-Video** (``SanaVideoTransformer3DModel``): ``SanaVideoPipeline``, ``SanaImageToVideoPipeline`` (batched CFG,
  per-token timesteps in I2V).

A guided forward has ``L`` latent rows and ``L + g`` rows of ``encoder_hidden_states`` and ``encoder_attention_mask``
(Gemma2 text with its padding mask): without CFG ``L = g = B`` (positive rows, then NAG-negative rows); the pipelines
batch CFG (``[uncond B; cond B]`` latent rows, text ``[uncond B; cond B; NAG-negative B]``, ``Family.batched_cfg``) and
only the conditional rows are guided. NAG acts in every block's text cross-attention ``attn2``: the latent queries
once (``to_q``, ``norm_q``), K/V (``to_k``/``norm_k``, ``to_v``) for every text row, one softmax attention per branch
with that branch's mask, the combine before ``to_out`` (``cross_attention.guided_cross_attention``). The linear
self-attention ``attn1``, the GLUMBConv feed-forward and the modulation (timestep and, on Sana-Sprint, the guidance
embedding: never the text) run at ``L`` rows.

The stock forward reshapes the projected text with ``.view(batch, -1, C)`` (batch = latent rows), which would fold
the extra text rows into the sequence. In a guided forward the caption projection's ``forward`` (``cross_attention.flattened_text_forward``,
one shared function) returns all ``L + g`` projected rows as one sequence broadcast (a stride-0 ``expand``, no copy)
to the ``L`` latent rows, which that ``view`` leaves as it is; the caption RMSNorm (``_caption_norm_forward``)
normalizes that sequence once and broadcasts it again; the processor reads the rows back. Neither model's forward
passes its attention kwargs to the blocks, so the record reaches the processors per thread (``call_state.record()``).

``nag_end`` is tested on the noisiest token's timestep (``torch.amax``: Sana-Video I2V passes per-token timesteps).
Sana and Sana-Video take ``t`` in [0, 1000]; Sana-Sprint (``guidance_embeds``) takes SCM's
``sin(s) / (sin(s) + cos(s))`` in [0, 1] (1 = pure noise), scaled by 1000 (``Family.timestep_scale`` as a function
of the model's configuration).

diffusers has no context-parallel plan (``_cp_plan``) for these models; a guided call on a model with a parallel
config is refused (``_refuse_parallel``).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0, SanaTransformer2DModel

from .. import call_state, cross_attention, forward_patch, parallel
from ..family import Family, ForwardPatch
from ..guided import as_kwargs, rows
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..versions import optional

SanaControlNetModel = optional("diffusers.models.controlnets.controlnet_sana", "SanaControlNetModel")
SanaVideoTransformer3DModel = optional(
    "diffusers.models.transformers.transformer_sana_video", "SanaVideoTransformer3DModel")
SanaVideoAttnProcessor2_0 = optional("diffusers.models.transformers.transformer_sana_video", "SanaAttnProcessor2_0")

# Recommended settings: nothing is published for Sana; this project's own starting point (docs/families/sana.md).
DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
VIDEO_DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
PIPELINES = {
    "SanaPipeline": {}, "SanaControlNetPipeline": {}, "SanaSprintPipeline": {}, "SanaSprintImg2ImgPipeline": {},
}
VIDEO_PIPELINES = {"SanaVideoPipeline": {}, "SanaImageToVideoPipeline": {}}

# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(parallel.refuse_without_plan, model=SanaTransformer2DModel, family="Sana")


def _caption_norm_forward(self, *args, **kwargs):
    """``forward`` of the caption RMSNorm: in a guided forward its input is ``cross_attention.flattened_text_forward``'s broadcast sequence;
    normalize one copy (the norm is per token) and broadcast it again. Otherwise the stock forward."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    if call_state.record() is None:
        return forward_patch.call_previous(self, **kw)
    x = kw["hidden_states"]
    return forward_patch.call_previous(self, **{**kw, "hidden_states": x[:1]}).expand(x.shape[0], -1, -1)


class _SanaCrossAttention(NAGProcessor):
    """The stock Sana cross-attention processor with NAG: in a guided forward (a record in ``call_state.record()``,
    set by the model's pre-hook) the text arrives flattened by ``cross_attention.flattened_text_forward``; every other
    call goes to the wrapped stock processor unchanged."""

    def _attend(self, query, key, value, mask):
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        nag = call_state.record()
        if nag is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        _refuse_parallel(self._parallel_config, "this call")
        latent_rows = hidden_states.shape[0]  # L
        text = encoder_hidden_states[0].unflatten(0, (-1, nag.text_len))  # [L + g, T, C]
        mask_pos = mask_neg = None
        if attention_mask is not None:  # [L + g, 1, T] bias (the model's -10000) -> [L + g, heads, 1, T]
            mask = attn.prepare_attention_mask(attention_mask, nag.text_len, text.shape[0])
            mask = mask.view(text.shape[0], attn.heads, -1, mask.shape[-1])
            mask_pos, mask_neg = mask[:latent_rows], mask[latent_rows:]
        query, key, value = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = cross_attention.guided_cross_attention(self._attend, query, key, value, nag, mask_pos, mask_neg)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class NAGSanaAttnProcessor(_SanaCrossAttention):
    """Sana's ``SanaAttnProcessor2_0`` (PyTorch SDPA called directly, as the stock processor does) with NAG."""

    stock = SanaAttnProcessor2_0

    def _attend(self, query, key, value, mask):
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value)), attn_mask=mask)
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class NAGSanaVideoAttnProcessor(_SanaCrossAttention):
    """Sana-Video's ``SanaAttnProcessor2_0`` (``dispatch_attention_fn``: the user's attention backend) with NAG."""

    stock = SanaVideoAttnProcessor2_0 if SanaVideoAttnProcessor2_0 is not None else type(None)

    def _attend(self, query, key, value, mask):
        return self.attend(query, key, value, mask)


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}", model=type(model))
    text = kw["encoder_hidden_states"]
    width = model.config.caption_channels
    if text.dim() != 3 or text.shape[-1] != width:
        raise ValueError(f"encoder_hidden_states must be [2B, T, caption_channels={width}] in a NAG call, got "
                         f"{tuple(text.shape)}")
    mask = kw.get("encoder_attention_mask")
    if mask is not None and mask.shape[0] != text.shape[0]:  # batched CFG: the pre-hook checks only 2B calls
        raise ValueError(f"encoder_attention_mask must have one row per row of encoder_hidden_states "
                         f"({text.shape[0]}), got {mask.shape[0]}")
    if mask is not None and mask.shape[-1] != text.shape[1]:
        raise ValueError(f"encoder_attention_mask must have the {text.shape[1]} tokens of encoder_hidden_states, got "
                         f"{tuple(mask.shape)}")
    for name in ("timestep", "guidance"):  # the modulation is per latent row: never the text's 2B rows
        n = rows(kw.get(name))
        if n not in (None, batch):
            raise ValueError(f"{name} must have the batch of hidden_states ({batch}) in a NAG call, got {n}: only "
                             "the text conditioning (encoder_hidden_states, encoder_attention_mask) has 2B rows")


def _timestep_scale(model) -> float:
    """The factor mapping the model's timestep to a scheduler timestep in [0, 1000]: Sana-Sprint (guidance
    embedding) takes SCM's timestep in [0, 1], Sana ``t`` itself."""
    return 1000.0 if getattr(model.config, "guidance_embeds", False) else 1.0


class SanaPrompts(PromptAdapter):
    """Sana's pipelines encode a negative like their own CFG negative prompt: without the complex human instruction,
    no CFG negative of its own. ``SanaSprintPipeline``'s ``encode_prompt`` has no ``do_classifier_free_guidance``:
    only the arguments the pipeline's ``encode_prompt`` takes are passed."""

    def encode_negative(self, encode, encode_args: dict, result, negatives: dict) -> dict:
        accepted = inspect.signature(encode).parameters

        def encode_accepted(**kwargs):
            return encode(**{key: value for key, value in kwargs.items() if key in accepted})

        return super().encode_negative(encode_accepted, encode_args, result, negatives)


def _prompts(per_image_arg: str) -> SanaPrompts:
    return SanaPrompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_attention_mask": 1},
        per_branch=(0, 1),
        forwarded=("device", per_image_arg, "max_sequence_length", "lora_scale", "clean_caption"),
        per_image_arg=per_image_arg,
        negative_kwargs=(("do_classifier_free_guidance", False), ("complex_human_instruction", None)),
    )


_CAPTION_PATCHES = (
    ForwardPatch(cross_attention.flattened_text_forward, lambda model: (model.caption_projection,)),
    ForwardPatch(_caption_norm_forward, lambda model: (model.caption_norm,)),
)
_COMMON = dict(
    token_order="cross_attention",
    guided_attention=lambda name, module: name.endswith("attn2"),  # the text cross-attention
    forward_patches=_CAPTION_PATCHES,
    per_branch=("encoder_attention_mask",),
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    batched_cfg=True,
    check=_check,
)

SANA = Family(
    name="Sana",
    models=tuple(m for m in (SanaTransformer2DModel, SanaControlNetModel) if m is not None),
    acts_in="the text cross-attention attn2 of every block (the ControlNet's too), each branch with its own text mask",
    processors={Attention: NAGSanaAttnProcessor},
    prompts=_prompts("num_images_per_prompt"),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    guided_models=("transformer", "controlnet"),
    timestep_scale=_timestep_scale,
    timestep_value=torch.amax,  # per-token timesteps (Sana-Video I2V): the noisiest token
    **_COMMON,
)
register_family(SANA)

if SanaVideoTransformer3DModel is not None and SanaVideoAttnProcessor2_0 is not None:
    SANA_VIDEO = Family(
        name="Sana-Video",
        models=(SanaVideoTransformer3DModel,),
        acts_in="the text cross-attention attn2 of every block, each branch with its own text mask",
        processors={Attention: NAGSanaVideoAttnProcessor},
        prompts=_prompts("num_videos_per_prompt"),
        pipelines=VIDEO_PIPELINES,
        defaults=VIDEO_DEFAULTS,
        timestep_value=torch.amax,  # I2V's per-token timesteps: the noise level of the noisiest token
        **_COMMON,
    )
    register_family(SANA_VIDEO)
