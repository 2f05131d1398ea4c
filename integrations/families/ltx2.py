"""NAG for LTX-2 (``LTX2VideoTransformer3DModel``: LTX-2.0, LTX-2.3, LTX-2.5): docs/families/ltx2.md.

LTX-2 denoises a video stream and an audio stream together. Each block has, per stream, a self-attention, a text
cross-attention (``attn2`` for the video, ``audio_attn2`` for the audio, each with its own text and mask) and the
audio-video attentions (``audio_to_video_attn``, ``video_to_audio_attn``). NAG acts in the two text
cross-attentions: the queries (video or audio tokens) are computed once, K/V for every text row, one attention per
branch with that branch's own mask rows, the gate of gated attention (LTX-2.3) on each branch's output, the combine
(docs/spec.md, "The combine") before ``to_out``. Everything else runs at the latent rows; the modulation depends on
the timestep and sigma only, never on the text.

A guided forward has ``L`` latent rows (``hidden_states``, ``audio_hidden_states``, timesteps, sigmas, coords) and
``L + g`` rows of ``encoder_hidden_states``, ``audio_encoder_hidden_states`` and both masks: without CFG
``L = g = B`` (positive, then NAG-negative); LTX-2 pipelines batch CFG (``[uncond B; cond B]`` latent rows, text
``[uncond B; cond B; NAG-negative B]``, ``Family.batched_cfg``) and only the conditional rows are guided.

How the extra text rows pass the stock forward, for both configurations:

- **LTX-2.0** (``caption_projection``): the stock forward reshapes the projected text with ``.view(batch, -1, C)``
  (``batch`` = latent rows), which would fold the extra rows into the sequence. In a guided forward
  ``cross_attention.flattened_text_forward`` (the shared ``forward`` of both caption projections) returns all ``L + g`` projected rows as
  one sequence broadcast to the ``L`` latent rows (a stride-0 ``expand``, no copy), which that ``view`` keeps; the
  processor reads the rows back.
- **LTX-2.3** (no caption projection; the text K/V input is modulated per block with ``L`` rows computed from
  ``sigma``, ``cross_attn_mod``): in a guided forward ``_mod_params`` (the blocks' ``get_mod_params``) gives the
  prompt modulation one row per text row (each NAG-negative row the row of its latent row), so the stock
  ``text * (1 + scale) + shift`` acts on all ``L + g`` rows. Without the patch it fails for ``B > 1`` and would
  pair rows wrongly otherwise. LTX-2.5's static prompt table (``use_prompt_adaln_single=False``) broadcasts as is.
  A configuration with both (a caption projection and a sigma modulation) modulates the broadcast sequence per latent
  row; the processor then reads each latent row's own text rows from its own copy.

The model does not pass its attention kwargs to the blocks, so the record reaches the processors per thread
(``call_state.record()``, ``Family.passes_attention_kwargs``). Both streams take the call's settings; the attention
kwargs ``audio_nag_scale`` / ``audio_nag_tau`` / ``audio_nag_alpha`` give the audio stream its own for one call
(``audio_nag_scale=1``: the audio stream unguided), handed to the audio processors per thread as well.

Pipelines: every LTX-2 pipeline computes its STG and modality-isolation passes (and the duration head's input) from
the positive half of the connectors' output, ``connector_prompt_embeds.chunk(2)[1]``. With CFG a NAG call therefore
encodes the CFG negative with the positive's rows appended (``[uncond; cond]``) and the positive with the NAG
negative's (``[cond; NAG-negative]``), so that half is exactly the positive and NAG-negative rows: every
positive-prompt pass (the conditional one, the STG-perturbed one, the modality-isolated one) is NAG-guided. The
batched-CFG call then carries ``[uncond; cond; cond; NAG-negative]``; ``_layout`` (a forward pre-hook after
NAG's own) drops the repeated rows before anything is computed, and a forward where NAG is off takes the first half
(``[uncond; cond]``, the stock call).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers.models.transformers.transformer_ltx2 import (
    LTX2Attention,
    LTX2AudioVideoAttnProcessor,
    LTX2PerturbedAttnProcessor,
    LTX2VideoTransformer3DModel,
    LTX2VideoTransformerBlock,
)

from .. import call_state, cross_attention
from ..family import Family, ForwardPatch, MethodPatch
from ..guided import as_kwargs, rows
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family

PIPELINES = {
    name: {}
    for name in (
        "LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline",
        "LTX2HDRPipeline", "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline",
    )
}
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
TEXT_ATTENTION = ("attn2", "audio_attn2")  # the text cross-attentions of each block (video, audio)
_TEXT_MARK = "_nag_ltx2_text"  # set by _patch on the text cross-attention modules: "video" / "audio" (static)
_CFG_SLOT = "ltx2_cfg_rows"  # call_state: (the pipeline call's config, prompt rows) of a NAG call with CFG
_AUDIO_SLOT = "ltx2_audio_record"  # call_state: the audio stream's record in a forward with audio settings, else None
# attention-kwargs keys that give the audio stream its own settings for one call (the video's apply otherwise)
AUDIO_KEYS = {"audio_nag_scale": "scale", "audio_nag_tau": "tau", "audio_nag_alpha": "alpha"}


# --- the text rows through the stock forward --------------------------------------------------------------------


def _caption_projections(model):
    if not model.config.use_prompt_embeddings:
        return ()
    return (model.caption_projection, model.audio_caption_projection)


def _mod_params(self, scale_shift_table, temb, batch_size):
    """``get_mod_params`` of the blocks of a model without caption projection (LTX-2.3): in a guided forward the
    prompt (text K/V) modulation gets one row per text row: the ``L`` latent rows' own, then the rows of the ``g``
    guided latent rows again for their NAG-negative text rows."""
    out = LTX2VideoTransformerBlock.get_mod_params(scale_shift_table, temb, batch_size)
    nag = call_state.record()
    if nag is None or not (
        scale_shift_table is getattr(self, "prompt_scale_shift_table", None)
        or scale_shift_table is getattr(self, "audio_prompt_scale_shift_table", None)
    ):
        return out
    first = nag.batch - nag.guided_rows
    return tuple(torch.cat([x, x[first:]]) for x in out)


def _modulated_blocks(model):
    if model.config.use_prompt_embeddings:  # the text is broadcast per latent row: the stock rows are right
        return ()
    return tuple(block for block in model.transformer_blocks if block.cross_attn_adaln)


def _text_rows(text: torch.Tensor, rows: int, guided: int) -> torch.Tensor:
    """The ``rows + guided`` text rows ``[R, T, C]`` of a guided cross-attention, from the text as it reaches the
    processor: ``[R, T, C]`` as is, or ``[rows, R * T, C]`` broadcast by ``cross_attention.flattened_text_forward`` (stride 0: row 0; a
    copy per latent row, modulated with that row's sigma: each latent row's own text rows from its own copy)."""
    total = rows + guided
    if text.shape[0] == total:
        return text
    if text.shape[1] % total:
        raise ValueError(f"NAG: the text sequence ({text.shape[1]}) is not {total} text rows of equal length")
    if text.stride(0) == 0 or rows == 1:
        return text[0].unflatten(0, (total, -1))
    per_row = text.unflatten(1, (total, -1))  # [L, R, T, C]
    own = torch.arange(rows, device=text.device)
    negative = torch.arange(rows - guided, rows, device=text.device)
    return torch.cat([per_row[own, own], per_row[negative, rows + torch.arange(guided, device=text.device)]])


def _safe_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask no query row can turn into NaN: a boolean mask as an additive bias, ``-inf`` as the dtype's
    lowest finite value. A row with every key masked then attends uniformly (as the model's own ``-10000`` bias does)
    instead of giving NaN; every other row is unchanged (its masked keys still get weight 0)."""
    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)
    return mask.to(dtype).clamp_min(lowest)


class NAGLTX2AttnProcessor(NAGProcessor):
    """``LTX2AudioVideoAttnProcessor`` / ``LTX2PerturbedAttnProcessor`` with NAG in the text cross-attentions
    (``attn2``, ``audio_attn2``): in a guided forward (a record in ``call_state.record()``) the queries once, K/V for
    every text row, one attention per branch with its mask rows, each branch gated (gated attention), the combine,
    ``to_out``. Every other call is the wrapped processor's."""

    stock = LTX2AudioVideoAttnProcessor

    @classmethod
    def can_wrap(cls, processor) -> bool:
        return any(
            isinstance(processor, stock) and type(processor).__call__ is stock.__call__
            for stock in (LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor)
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        nag = call_state.record()
        stream = getattr(attn, _TEXT_MARK, None)
        if nag is None or encoder_hidden_states is None or stream is None:
            extra = {}
            if isinstance(self.inner, LTX2PerturbedAttnProcessor):
                extra = {"perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed}
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                              key_rotary_emb, **extra)
        if query_rotary_emb is not None or perturbation_mask is not None:
            raise ValueError("NAG guides LTX-2's text cross-attention without RoPE or STG perturbation")
        rows, guided = hidden_states.shape[0], nag.guided_rows
        if stream == "audio":
            nag = call_state.peek(_AUDIO_SLOT) or nag  # the audio stream's own settings, when the call gives them
        text = _text_rows(encoder_hidden_states, rows, guided)
        total = text.shape[0]
        mask_pos = mask_neg = None
        if attention_mask is not None:  # as the stock processor: [R, 1, T] bias -> [R, heads, 1, T]
            mask = attn.prepare_attention_mask(attention_mask, text.shape[1], total)
            mask = _safe_mask(mask.view(total, attn.heads, -1, mask.shape[-1]), hidden_states.dtype)
            mask_pos, mask_neg = mask[:rows], mask[rows:]
        gates = None
        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # [L, N, H], the same in both branches
        query = attn.norm_q(attn.to_q(hidden_states))
        key, value = attn.norm_k(attn.to_k(text)), attn.to_v(text)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))

        def attend(q, k, v, mask):
            out = self.attend(q, k, v, mask)
            if gates is None:
                return out
            gate = gates[gates.shape[0] - q.shape[0]:]  # the rows of these queries: all, or the guided last ones
            return (out.unflatten(2, (attn.heads, -1)) * gate.unsqueeze(-1)).flatten(2, 3)

        out = cross_attention.guided_cross_attention(attend, query, key, value, nag, mask_pos, mask_neg)
        return attn.to_out[1](attn.to_out[0](out))


# --- the pipelines' CFG layout --------------------------------------------------------------------------------------

_PER_TEXT_ROW = ("encoder_hidden_states", "audio_encoder_hidden_states", "encoder_attention_mask",
                 "audio_encoder_attention_mask")


def _audio_settings(extra: dict, nag):
    """The audio stream's record for this forward: ``nag`` with the ``audio_nag_*`` values of the call (popped from
    the attention kwargs), or ``None`` when the call gives none."""
    given = {AUDIO_KEYS[key]: extra.pop(key) for key in list(extra) if key in AUDIO_KEYS}
    if not given or nag is None:
        return None
    for field, value in given.items():
        name = f"audio_nag_{field}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if (field == "scale" and not value >= 1) or (field == "tau" and not value > 0) or (
                field == "alpha" and not 0 <= value <= 1):
            bound = {"scale": ">= 1", "tau": "> 0", "alpha": "in [0, 1]"}[field]
            raise ValueError(f"{name} must be {bound}, got {value}")
    return dataclasses.replace(nag, **{f: torch.tensor(float(v), dtype=torch.float64) for f, v in given.items()})


def _layout(model, args, kwargs):
    """A forward pre-hook after NAG's own: the audio stream's settings of the call (``audio_nag_*`` attention
    kwargs, per thread for the processors), and the rows of a NAG pipeline call with CFG, whose batched call carries
    the text rows ``[uncond; cond; cond; NAG-negative]`` (module docstring): the guided forward takes ``[uncond;
    cond; NAG-negative]``, guided on its last ``B`` latent rows."""
    nag = call_state.record()
    kw = as_kwargs(model._nag_state.names, args, kwargs)
    extra = kw.get("attention_kwargs")
    audio = None
    if isinstance(extra, dict) and any(key in extra for key in AUDIO_KEYS):
        extra = kw["attention_kwargs"] = dict(extra)
        audio = _audio_settings(extra, nag)
    call_state.put(_AUDIO_SLOT, audio)
    marked = call_state.peek(_CFG_SLOT)
    if nag is not None and marked is not None and marked[0] is call_state.call_config():
        prompts = marked[1]
        if rows(kw.get("hidden_states")) == 2 * prompts and rows(kw.get("encoder_hidden_states")) == 4 * prompts:
            for name in _PER_TEXT_ROW:
                x = kw.get(name)
                if isinstance(x, torch.Tensor) and x.shape[0] == 4 * prompts:
                    kw[name] = torch.cat([x[: 2 * prompts], x[3 * prompts:]])
            nag = dataclasses.replace(nag, guided=prompts)
            call_state.set_record(nag)
            if audio is not None:
                call_state.put(_AUDIO_SLOT, dataclasses.replace(audio, guided=prompts))
    return (), kw


def _patch(model):
    marked = []
    for name, module in model.named_modules():
        if isinstance(module, LTX2Attention) and name.rsplit(".", 1)[-1] in TEXT_ATTENTION:
            module.__dict__[_TEXT_MARK] = "audio" if name.endswith("audio_attn2") else "video"
            marked.append(module)
    handle = model.register_forward_pre_hook(_layout, with_kwargs=True)
    return marked, handle


def _restore(model, undo):
    marked, handle = undo
    handle.remove()
    for module in marked:
        module.__dict__.pop(_TEXT_MARK, None)


class LTX2PromptAdapter(PromptAdapter):
    """The LTX-2 pipelines' ``encode_prompt`` (Gemma3 hidden states and the tokenizer's mask, before the pipeline's
    connectors). With CFG the CFG negative gets the positive's rows appended too (module docstring); the DFR
    pipelines' ``encode_prompt`` (no CFG) takes no ``do_classifier_free_guidance``."""

    def encode_negative(self, encode, encode_args, result, negatives):
        parameters = inspect.signature(encode).parameters
        adapter = self
        if any(name not in parameters for name, _ in self.negative_kwargs):
            adapter = dataclasses.replace(
                self, negative_kwargs=tuple(item for item in self.negative_kwargs if item[0] in parameters))
        negative = PromptAdapter.encode_negative(adapter, encode, encode_args, result, negatives)
        cfg = encode_args.get("do_classifier_free_guidance", _default(parameters, "do_classifier_free_guidance"))
        if cfg and isinstance(result, (tuple, list)) and len(result) >= 4 and result[2] is not None:
            prompts = result[0].shape[0]
            call_state.put(_CFG_SLOT, (call_state.call_config(), prompts))
            negative["cfg"] = True
        return negative

    def append(self, result, negative):
        out = list(PromptAdapter.append(self, result, {k: v for k, v in negative.items() if k != "cfg"}))
        if negative.get("cfg"):
            for index in (2, 3):  # [uncond; cond]: the pipeline's chunk(2)[1] is then [cond; NAG-negative]
                out[index] = torch.cat([result[index], result[index - 2].to(result[index].dtype)])
        return type(result)(out) if isinstance(result, tuple) else out


def _default(parameters, name):
    parameter = parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


# --- checks -------------------------------------------------------------------------------------------------------


def _check(model, kw: dict, batch: int) -> None:
    text = kw["encoder_hidden_states"]
    total = text.shape[0]
    config = model.config
    width = config.caption_channels if config.use_prompt_embeddings else config.cross_attention_dim
    if text.shape[-1] != width:
        raise ValueError(f"encoder_hidden_states must have width {width}, got {text.shape[-1]}")
    audio_text = kw.get("audio_encoder_hidden_states")
    if not isinstance(audio_text, torch.Tensor):
        raise ValueError(
            "audio_encoder_hidden_states is required in a NAG call (its rows: positive, then NAG-negative)")
    audio_width = config.caption_channels if config.use_prompt_embeddings else config.audio_cross_attention_dim
    if audio_text.shape[-1] != audio_width:
        raise ValueError(f"audio_encoder_hidden_states must have width {audio_width}, got {audio_text.shape[-1]}")
    for name in _PER_TEXT_ROW[1:]:
        x = kw.get(name)
        if isinstance(x, torch.Tensor) and x.shape[0] != total:
            raise ValueError(
                f"{name} must have {total} rows like encoder_hidden_states in a NAG call, got {x.shape[0]}")
    for name in ("audio_hidden_states", "timestep", "audio_timestep", "sigma", "audio_sigma", "video_coords",
                 "audio_coords", "perturbation_mask", "video_self_attention_mask", "video_keyframes_mask"):
        x = kw.get(name)
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must have the {batch} rows of hidden_states in a NAG call (only the text and its masks have "
                f"a row per text row), got {x.shape[0]}")
    parallel = getattr(model, "_parallel_config", None)
    if getattr(parallel, "context_parallel_config", None) is not None and any(
        kw.get(name) is not None for name in ("encoder_attention_mask", "audio_encoder_attention_mask")
    ):
        raise ValueError(
            "encoder_attention_mask / audio_encoder_attention_mask: LTX-2 under context parallelism takes no text "
            "masks (diffusers' plan splits the video mask along the text and Ulysses cannot apply it; the stock model "
            "fails there too); pass None (e.g. connectors with learnable registers give all-ones masks)")


_MODULAR_STATE = ("connector_prompt_embeds", "connector_audio_prompt_embeds", "connector_attention_mask")


def _modular_join(positive: dict, negative: dict) -> dict:
    """``ModularSpec.join`` of LTX-2's modular blocks: the NAG negative's rows after the positive's, for each of the
    connectors' three outputs (``negative``: a tensor or the core's per-image list)."""
    if any(negative.get(name) is None for name in positive):
        raise ValueError(
            "LTX-2's modular blocks take nag_negative_prompt (text): their conditioning is the connectors' three "
            "outputs, and pre-encoded NAG negatives are the classic pipelines' Gemma embeddings")

    def rows(name):
        x = negative[name]
        if isinstance(x, (list, tuple)):
            x = torch.cat([e if e.dim() == positive[name].dim() else e[None] for e in x])
        return x.to(device=positive[name].device, dtype=positive[name].dtype)

    return {name: torch.cat([positive[name], rows(name)]) for name in positive}




LTX2 = Family(
    name="LTX-2",




    modular=ModularSpec(




        model_names=("ltx2", "ltx2.5"),




        outputs={0: "connector_prompt_embeds", 1: "connector_attention_mask", 2: "connector_audio_prompt_embeds"},




        per_branch=_MODULAR_STATE,




        guider_inputs={"connector_prompt_embeds": "encoder_hidden_states",




                       "connector_audio_prompt_embeds": "audio_encoder_hidden_states",




                       "connector_attention_mask": "encoder_attention_mask"},




        join=_modular_join,




        pipelines={"LTX2AutoBlocks": "LTX2Pipeline", "LTX2Blocks": "LTX2Pipeline", "LTX25AutoBlocks": "LTX2Pipeline"},




    ),
    models=(LTX2VideoTransformer3DModel,),
    token_order="cross_attention",
    acts_in="the text cross-attentions attn2 (video) and audio_attn2 (audio) of every block, each branch with its "
            "own text mask",
    processors={LTX2Attention: NAGLTX2AttnProcessor},
    forward_patches=(ForwardPatch(cross_attention.flattened_text_forward, _caption_projections),),
    method_patches=(MethodPatch("get_mod_params", _mod_params, _modulated_blocks),),
    guided_attention=lambda name, module: name.rsplit(".", 1)[-1] in TEXT_ATTENTION,
    patch=_patch,
    restore=_restore,
    prompts=LTX2PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_attention_mask": 1},
        per_branch=(0, 1),
        forwarded=("device", "num_videos_per_prompt", "max_sequence_length", "dtype"),
        per_image_arg="num_videos_per_prompt",
        negative_kwargs=(("do_classifier_free_guidance", False),),
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    per_branch=_PER_TEXT_ROW[1:],
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    batched_cfg=True,
    check=_check,
    timestep_value=torch.amax,  # per-token timesteps (image conditioning, DFR): the noisiest token
)
register_family(LTX2)
