"""NAG for Wan Animate 2 (``WanAnimate2Transformer3DModel``; modular only: ``WanAnimate2Blocks``,
``WanAnimate2DistilledBlocks``): docs/families/wananimate2.md.

The model runs in two modes. ``kv_cache_mode="extract"`` (the reference pass, once per segment) encodes the driving
video and stores every layer's pre-RoPE self-attention K/V in a ``WanAnimate2KVCache``; ``kv_cache_mode="cached"``
(every denoising forward) attends over the generation tokens plus the cached reference tokens of the same frame
through a flex ``BlockMask``. Each block then runs a Wan-style text cross-attention (``cross_attn``), with the CLIP
image tokens as a separate additive branch, and the FFN.

A guided forward has ``B`` latent rows (``hidden_states``, ``condition_latents``, ``encoder_hidden_states_image``)
and ``2B`` text rows (``encoder_hidden_states``, a list of ``[L, text_dim]`` tensors or a ``[2B, L, text_dim]``
tensor: positive, then NAG-negative). Nothing in the model but the text cross-attention reads the text batch, so the
stock forward runs unchanged: the text embedder projects ``2B`` rows, the self-attention (over the KV cache), the
modulation and the FFN run at ``B`` rows, and ``NAGWanAnimate2CrossAttnProcessor`` in every ``cross_attn`` computes
the video queries once, text K/V for ``2B`` rows, one attention per branch and the NAG combine
(``cross_attention.guided_cross_attention``); the image branch is attended once and added after the combine, before
``to_out``. The reference pass is conditioning, never guided: an ``"extract"`` call given ``2B`` text rows runs plain
on its first ``B`` (the KV cache it writes is the stock one).

The model's forward passes no attention kwargs to its blocks (it takes none), so the record reaches the processors
per thread (``call_state.record()``, ``Family.passes_attention_kwargs``). diffusers has no context-parallel plan
(``_cp_plan``) for this model: a guided call under a parallel config is refused.

Modular pipelines: diffusers' denoise block (``WanAnimate2SegmentDenoiseInner`` and its distilled subclass) hands
the transformer only the first row of the text conditioning (``encoder_hidden_states[0]``). ``patch_blocks`` puts
NAG-aware subclasses in their place (``NAGWanAnimate2SegmentDenoiseInner``,
``NAGWanAnimate2DistilledSegmentDenoiseInner``): they compute exactly the stock blocks' results unless the call
carries the NAG rows, and then pass the positive and the NAG-negative row of the conditional pass. ``modular_spec()``
is the ``ModularSpec`` this family needs, its ``blocks`` hook ``patch_blocks`` (docs/families/wananimate2.md,
"Modular pipelines").
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers.models.transformers.transformer_wan_animate_2 import (
    WanAnimate2Attention,
    WanAnimate2CrossAttnProcessor,
    WanAnimate2Transformer3DModel,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from diffusers.modular_pipelines.modular_pipeline import LoopSequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam
from diffusers.modular_pipelines.wan_animate_2.denoise import (
    WanAnimate2DistilledSegmentDenoiseInner,
    WanAnimate2SegmentDenoiseInner,
)
from tqdm import tqdm

from .. import call_state, cross_attention, parallel
from ..family import Family
from ..guided import rows
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family

# Nothing published for Wan Animate 2: this project's starting point, the authors' Wan values (the same backbone).
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
BLOCKS = {"WanAnimate2Blocks": {}, "WanAnimate2DistilledBlocks": {}}  # modular blocks -> settings that differ there

TEXT = "encoder_hidden_states"
LATENTS = "hidden_states"
RECORD = "nag_guidance"  # integrations.modular.RECORD: the PipelineState entry of the call's NAGCall


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(
    parallel.refuse_without_plan, model=WanAnimate2Transformer3DModel, family="Wan Animate 2"
)


class NAGWanAnimate2CrossAttnProcessor(NAGProcessor):
    """``WanAnimate2CrossAttnProcessor`` with NAG: a call with more text rows than video rows and a record
    (``call_state.record()``, set by the model's pre-hook) is guided; every other call (plain forwards, the reference
    pass) goes to the wrapped stock processor. The self-attention keeps its own stock processor."""

    stock = WanAnimate2CrossAttnProcessor

    def __call__(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_image=None):
        nag = call_state.record()
        if not cross_attention.is_guided_call(nag, hidden_states, encoder_hidden_states):
            return self.inner(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_image)
        _refuse_parallel(self._parallel_config, "this call")
        # hidden_states [B, N, C]; encoder_hidden_states [2B, T, C]; encoder_hidden_states_image [B, I, C]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = cross_attention.guided_cross_attention(self.attend, query, key, value, nag)  # [B, N, C], combined
        if encoder_hidden_states_image is not None:  # the CLIP image tokens: once, unguided, added after the combine
            key_image, value_image = _get_added_kv_projections(attn, encoder_hidden_states_image)
            key_image = attn.norm_added_k(key_image).unflatten(2, (attn.heads, -1))
            out = out + self.attend(query, key_image, value_image.unflatten(2, (attn.heads, -1)))
        return attn.to_out[1](attn.to_out[0](out))


def _width(x) -> int | None:
    return x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    config = model.config
    for index, u in enumerate(kw[TEXT]):
        if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[-1] != config.text_dim:
            shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"{TEXT}[{index}] must be [L, text_dim={config.text_dim}] (L <= text_len="
                             f"{config.text_len}) in a NAG call, got {shape}")
        if u.shape[0] > config.text_len:
            raise ValueError(f"{TEXT}[{index}] has {u.shape[0]} tokens, more than text_len={config.text_len}")
    n = rows(kw.get("condition_latents"))
    if n != batch:
        raise ValueError(f"condition_latents must have the batch of {LATENTS} ({batch}) in a NAG call, got {n}")
    image = kw.get("encoder_hidden_states_image")
    if image is not None and rows(image) != batch:
        raise ValueError(f"encoder_hidden_states_image must have the batch of {LATENTS} ({batch}) in a NAG call (the "
                         f"branches share the image tokens), got {rows(image)}")
    if kw.get("is_uncondtion"):
        raise ValueError("is_uncondtion=True marks CFG's unconditional pass, which NAG leaves plain: pass the NAG "
                         f"negative's rows in {TEXT} on the conditional pass only")


class WanAnimate2Family(Family):
    """Wan Animate 2's family: the text is a per-sample list (``text_len`` reads its longest entry), and the reference
    pass (``kv_cache_mode="extract"``) stays plain whatever its text rows."""

    def text_len(self, text) -> int:
        return max(u.shape[0] for u in text)

    def deliver(self, kw: dict, extra: dict, record) -> None:
        if kw.get("kv_cache_mode") == "extract":  # the reference pass is conditioning: plain, on the positive rows
            kw[TEXT] = kw[TEXT][: record.batch]
            call_state.set_record(None)
            return
        super().deliver(kw, extra, record)


WANANIMATE2 = WanAnimate2Family(
    name="Wan Animate 2",
    models=(WanAnimate2Transformer3DModel,),
    token_order="cross_attention",
    acts_in="the text cross-attention cross_attn of every block in the denoising (kv_cache_mode='cached') forwards "
            "(the CLIP image branch and the reference pass unguided)",
    processors={WanAnimate2Attention: NAGWanAnimate2CrossAttnProcessor},
    guided_attention=lambda name, module: module.is_cross_attention,
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device", "max_sequence_length"),
        per_image_arg="num_videos_per_prompt",
    ),
    pipelines=BLOCKS,
    defaults=DEFAULTS,
    latents=LATENTS,
    text=TEXT,
    attention_kwargs=None,  # the model's forward takes none
    passes_attention_kwargs=False,
    modes=("exact",),
    check=_check,
)
register_family(WANANIMATE2)


# --------------------------------------------------------------------------------------------------------------------
# Modular blocks


def _nag_rows(block_state, batch, text) -> bool:
    """Whether this guider batch's text carries the NAG negative's rows after the positive's (``2P`` rows for the
    ``P`` rows the prompt was encoded with): the conditional pass of a call in which NAG acts."""
    call = getattr(block_state, RECORD, None)
    prompts = getattr(call, "prompts", None)
    return prompts is not None and not batch.is_uncondtion and rows(text) == 2 * prompts


class NAGWanAnimate2SegmentDenoiseInner(WanAnimate2SegmentDenoiseInner):
    """``WanAnimate2SegmentDenoiseInner`` passing the NAG negative's row too: the stock block hands the transformer
    the first text row of each guider batch only; on the conditional pass of a NAG call (its text carries the NAG
    rows, ``_nag_rows``) this one hands it the first positive row and the first NAG-negative row, the guided forward
    of the transformer contract. Every other batch gets the stock first row; the loop is the stock one otherwise."""

    @property
    def description(self) -> str:
        return f"{super().description}\n(with Normalized Attention Guidance, nag-kernels)"

    @property
    def inputs(self) -> list[InputParam]:
        return [*super().inputs, InputParam(RECORD, description="the call's NAG record (nag-kernels)")]

    @torch.no_grad()
    def __call__(self, components, block_state, k: int):
        # The stock __call__ (diffusers 0.42.1) with one change: the encoder_hidden_states list (marked below).
        transformer_dtype = components.transformer.dtype

        guider_inputs = {
            "encoder_hidden_states": (block_state.prompt_embeds, block_state.negative_prompt_embeds),
            "is_uncondtion": (False, True),
        }
        transformer_args = set(inspect.signature(components.transformer.forward).parameters.keys())
        shared_kwargs = {
            name: value.to(transformer_dtype) if isinstance(value, torch.Tensor) else value
            for name, value in block_state.denoiser_input_fields.items()
            if name in transformer_args and name not in guider_inputs
        }

        with tqdm(total=len(block_state.timesteps), desc=f"Segment {k + 1}/{block_state.num_segments}") as bar:
            for i, t in enumerate(block_state.timesteps):
                timestep = torch.stack([t])

                components.guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
                guider_state = components.guider.prepare_inputs(guider_inputs)

                for guider_state_batch in guider_state:
                    components.guider.prepare_models(components.transformer)

                    text = guider_state_batch.encoder_hidden_states
                    texts = [text[0]]  # the stock block's one row
                    if _nag_rows(block_state, guider_state_batch, text):  # NAG: and the first NAG-negative row
                        texts.append(text[rows(text) // 2])
                    guider_state_batch.noise_pred = components.transformer(
                        [block_state.latents.to(transformer_dtype)],
                        timestep=timestep,
                        encoder_hidden_states=[u.to(transformer_dtype) for u in texts],
                        condition_latents=[block_state.reference_latents.to(transformer_dtype)],
                        kv_cache=block_state.kv_cache,
                        kv_cache_mode="cached",
                        seq_len=block_state.max_seq_len,
                        reference_grid_sizes=block_state.grid_sizes_ref,
                        origin_len=block_state.segment_frame_length,
                        origin_area=[block_state.height, block_state.width],
                        is_uncondtion=guider_state_batch.is_uncondtion,
                        **shared_kwargs,
                    ).sample[0]

                    components.guider.cleanup_models(components.transformer)

                noise_pred = components.guider(guider_state)[0]

                latents = components.scheduler.step(
                    noise_pred.unsqueeze(0),
                    t,
                    block_state.latents.unsqueeze(0),
                    return_dict=False,
                    generator=block_state.generator,
                )[0]
                block_state.latents = latents.squeeze(0)

                bar.update()

        return components, block_state


class NAGWanAnimate2DistilledSegmentDenoiseInner(NAGWanAnimate2SegmentDenoiseInner,
                                                 WanAnimate2DistilledSegmentDenoiseInner):
    """``WanAnimate2DistilledSegmentDenoiseInner`` (its guider defaults to ``guidance_scale=1.0``: the conditional
    pass only) passing the NAG negative's row too, as ``NAGWanAnimate2SegmentDenoiseInner``."""


# stock block class -> its NAG-aware subclass (exact classes: a user's own subclass is left alone)
REPLACEMENTS = {
    WanAnimate2SegmentDenoiseInner: NAGWanAnimate2SegmentDenoiseInner,
    WanAnimate2DistilledSegmentDenoiseInner: NAGWanAnimate2DistilledSegmentDenoiseInner,
}


def patch_blocks(blocks) -> int:
    """Replace, in place, every stock Wan Animate 2 segment denoise block of ``blocks`` (a
    ``WanAnimate2Blocks`` / ``WanAnimate2DistilledBlocks``, or any composition of their blocks) by its NAG-aware
    subclass (``REPLACEMENTS``); returns how many. The subclasses are the stock blocks without NAG, so patched blocks
    run stock calls unchanged.

    In place on a copy only: diffusers' preset blocks share their nested sub-blocks between instances (the module
    level ``BLOCKS`` dicts hold block objects, not classes), so patching a fresh ``WanAnimate2Blocks()`` in place would
    patch every other one. ``apply_nag`` runs this on its own deep copy (``modular_spec``) and ``remove_nag`` puts the
    original blocks back; ``nag_blocks`` returns a patched copy for blocks composed by hand."""
    count = 0
    for name, block in list((blocks.sub_blocks or {}).items()):
        new = REPLACEMENTS.get(type(block))
        if new is not None:
            blocks.sub_blocks[name] = new()
            count += 1
        elif isinstance(block, LoopSequentialPipelineBlocks) or getattr(block, "sub_blocks", None):
            count += patch_blocks(block)
    return count


def nag_blocks(blocks):
    """A deep copy of ``blocks`` with NAG-aware denoise blocks (``patch_blocks``), for composing by hand with
    ``modular.NAGTextEncoderStep`` and ``NAGGuidance``::

        >>> blocks = nag_blocks(WanAnimate2DistilledBlocks())
        >>> blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
        >>> pipe = blocks.init_pipeline("Wan-AI/Wan2.2-Animate-2-14B-Distilled-Diffusers")
        >>> pipe.load_components(dtype=torch.bfloat16)
        >>> pipe.update_components(guider=NAGGuidance(guidance_scale=1.0, nag_scale=9.0))
    """
    import copy

    patched = copy.deepcopy(blocks)
    if not patch_blocks(patched):
        raise TypeError(f"{type(blocks).__name__} has no Wan Animate 2 segment denoise block")
    return patched


def modular_spec():
    """The ``ModularSpec`` of Wan Animate 2's blocks (docs/families/wananimate2.md): the text conditioning is
    ``prompt_embeds`` (one row per prompt, the transformer's ``encoder_hidden_states``), and ``apply_nag``'s copy of
    the blocks gets the NAG-aware denoise blocks (``blocks=patch_blocks``)."""
    return ModularSpec(
        model_names=("wan-animate-2", "wan-animate-2-distilled"),
        outputs={0: "prompt_embeds"},
        guider_inputs={"prompt_embeds": "encoder_hidden_states"},
        pipelines={name: name for name in BLOCKS},
        blocks=patch_blocks,
    )


WANANIMATE2.modular = modular_spec()  # declared here, after the denoise blocks it patches
