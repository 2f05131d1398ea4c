"""NAG for Kandinsky 6 (``Kandinsky6Transformer3DModel``, ``Kandinsky6TI2VAPipeline``): docs/families/kandinsky6.md.

A guided forward has ``B`` video rows (and ``B`` audio rows when audio is denoised) and ``2B`` text rows
(``encoder_hidden_states`` and ``encoder_attention_mask``: positive, then NAG-negative); ``timestep`` has ``B`` rows
and ``pooled_projections`` ``B`` or ``2B`` (only the positive rows are used). The pooled CLIP vector enters the
modulation of everything (``temb = time + pooled``), so the guided forward keeps one, positive, ``temb`` per video:
the video and audio streams are never duplicated.

- **Text blocks** (per modality, before the fused blocks) run per branch at ``2B`` rows. Their modulation takes the
  positive ``temb`` of each row's video (``_text_block_forward``: ``temb`` tiled to ``2B`` rows, a shared forward of
  ``Kandinsky6TransformerEncoderBlock``), so the NAG-negative text is encoded as in a plain call whose pooled vector
  is the positive prompt's. The blocks' masked self-attention reads each row's own mask.
- **Fused blocks**: the text cross-attention of each modality (``video_dec_block.cross_attention``,
  ``audio_dec_block.cross_attention``) computes the queries once (``B`` rows), K/V for all ``2B`` text rows, one
  attention per branch with that branch's mask rows and the NAG combine (per token over the modality's width)
  before ``out_layer`` (``NAGKandinsky6AttnProcessor``, ``cross_attention.guided_cross_attention``). Everything else
  (self-attention, the audio-video attention, which reads the pre-cross-attention streams, the FFNs, the gates, the
  output heads) runs at ``B`` rows, unchanged.

The model's forward passes no attention kwargs to its blocks (it takes none), so the record reaches the processors
per thread (``call_state.record()``, ``Family.passes_attention_kwargs``), and a direct model call takes its settings
from ``apply_nag`` (or a pipeline call's). diffusers has no context-parallel plan for this model: a guided call under
a parallel config is refused. Under gradient checkpointing the recomputed blocks get the guided forward's record bound
to their call (``guided.carry_record_into_checkpoints``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from diffusers.models.transformers.transformer_kandinsky6 import (
    Kandinsky6Attention,
    Kandinsky6AttnProcessor,
    Kandinsky6Transformer3DModel,
    Kandinsky6TransformerEncoderBlock,
    apply_rotary,
)

from .. import call_state, cross_attention, forward_patch, parallel
from ..family import Family, ForwardPatch
from ..guided import as_kwargs, rows
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family

PIPELINES = {"Kandinsky6TI2VAPipeline": {}}
# Nothing published for Kandinsky 6: this project's starting point, the authors' Wan values (a text cross-attention
# video model, also run distilled without CFG).
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}

POOLED = "pooled_projections"
# encode_prompt's result: (embeds, pooled, mask, CFG negative embeds, its pooled, its mask)
MASK = 2  # the index of the prompt's attention mask


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(
    parallel.refuse_without_plan, model=Kandinsky6Transformer3DModel, family="Kandinsky 6"
)


class NAGKandinsky6AttnProcessor(NAGProcessor):
    """``Kandinsky6AttnProcessor`` with NAG in the text cross-attention: a call with more text rows than query rows
    and a record (``call_state.record()``, set by the model's pre-hook) is guided; every other call (self-attention,
    the text blocks, the audio-video attention, plain forwards) goes to the wrapped stock processor unchanged."""

    stock = Kandinsky6AttnProcessor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, rotary_emb_kv=None,
                 attn_mask=None):
        nag = call_state.record()
        if not cross_attention.is_guided_call(nag, hidden_states, encoder_hidden_states):
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, rotary_emb=rotary_emb,
                              rotary_emb_kv=rotary_emb_kv, attn_mask=attn_mask)
        _refuse_parallel(self._parallel_config, "this call")
        batch = hidden_states.shape[0]  # B query rows; encoder_hidden_states [2B, T, C]
        query = attn.to_query(hidden_states)
        key, value = attn.to_key(encoder_hidden_states), attn.to_value(encoder_hidden_states)
        query, key, value = (x.reshape(*x.shape[:-1], attn.num_heads, -1) for x in (query, key, value))
        query, key = attn.query_norm(query), attn.key_norm(key)
        if rotary_emb is not None:  # as the stock processor (the text cross-attention passes none)
            query = apply_rotary(query, rotary_emb).to(dtype=query.dtype)
        if rotary_emb_kv is not None:
            key = apply_rotary(key, rotary_emb_kv).to(dtype=key.dtype)
        mask_pos = mask_neg = None
        if attn_mask is not None:  # one row per text row, as the stock processor passes it to the backend
            mask_pos, mask_neg = attn_mask[:batch], attn_mask[batch:]
        out = cross_attention.guided_cross_attention(self.attend, query, key, value, nag, mask_pos, mask_neg)
        return attn.out_layer(out)


def _text_block_forward(self, *args, **kwargs):
    """``forward`` of every text block: in a guided forward (``2B`` text rows, ``B`` rows of ``time_embed``) the
    positive ``time_embed`` of each video serves both of its text rows; otherwise the stock forward."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    x, temb = kw["x"], kw["time_embed"]
    if call_state.record() is not None and x.shape[0] == 2 * temb.shape[0]:
        kw["time_embed"] = torch.cat([temb, temb])
    return forward_patch.call_previous(self, **kw)


def _text_blocks(model):
    return [m for m in model.modules() if isinstance(m, Kandinsky6TransformerEncoderBlock)]


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    config = model.config
    text = kw["encoder_hidden_states"]
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != config.in_text_dim:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"encoder_hidden_states must be [2B, T, in_text_dim={config.in_text_dim}] in a NAG call, got "
                         f"{shape}")
    pooled = kw.get(POOLED)
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[-1] != config.in_text_dim2:
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"{POOLED} must be [B or 2B, in_text_dim2={config.in_text_dim2}] in a NAG call, got {shape}")
    if rows(pooled) not in (batch, 2 * batch):
        raise ValueError(f"{POOLED} must have batch {batch} or {2 * batch} in a NAG call (the positive rows are used), "
                         f"got {rows(pooled)}")
    for name in ("timestep", "audio_hidden_states", "visual_token_type_ids"):
        n = rows(kw.get(name))
        if n is not None and n != batch:
            raise ValueError(f"{name} must have the batch of hidden_states ({batch}) in a NAG call, got {n}")
    mask = kw.get("encoder_attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"encoder_attention_mask must be [2B, T] = {tuple(text.shape[:2])} like encoder_hidden_states "
                         f"in a NAG call, got {tuple(mask.shape)}")


class Kandinsky6Family(Family):
    """Kandinsky 6's family: ``pooled_projections`` may come with ``2B`` rows (a caller that appended the NAG
    negative's pooled vector too); the guided forward keeps the positive rows (module docstring)."""

    def check_guided(self, model, kw: dict, batch: int) -> None:
        super().check_guided(model, kw, batch)
        if rows(kw[POOLED]) == 2 * batch:
            kw[POOLED] = kw[POOLED][:batch]


@dataclasses.dataclass(frozen=True)
class Kandinsky6Prompts(PromptAdapter):
    """How ``Kandinsky6TI2VAPipeline`` encodes a NAG negative: its ``encode_prompt`` encodes the call's prompt and the
    CFG negative in one call (the prompt made a list, or rewritten by ``expand_prompts`` first), so that call is the
    positive encoding; the negative's token embeddings and padding mask are appended to the prompt's (a mask the
    pipeline leaves out because no row is padded becomes all True when the other branch has one)."""

    def is_positive(self, call_args: dict, encode_args: dict) -> bool:
        return True  # the pipeline calls encode_prompt once per call, for the call's own prompt

    def check(self, negatives: dict) -> None:
        super().check(negatives)
        mask = negatives.get("nag_negative_prompt_attention_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            raise TypeError("nag_negative_prompt_attention_mask must be a bool (or 0/1 integer) padding mask like the "
                            f"pipeline's (True = a real token), got {mask.dtype}")

    def append(self, result, negative: dict):
        ref, x = result[0], negative[0]
        if x.shape[1:] != ref.shape[1:]:
            raise ValueError(
                f"nag_negative_prompt_embeds must have the per-row shape {tuple(ref.shape[1:])} of the prompt's (same "
                f"max_sequence_length), got {tuple(x.shape[1:])}"
            )
        out = list(result)
        out[0] = torch.cat([ref, x.to(device=ref.device, dtype=ref.dtype)])
        mask_pos, mask_neg = result[MASK], negative.get(MASK)
        if mask_pos is not None or mask_neg is not None:
            shape = tuple(ref.shape[1:2])

            def full(mask, n, name):
                if mask is None:
                    return torch.ones(n, *shape, dtype=torch.bool, device=ref.device)
                if tuple(mask.shape) != (n, *shape):
                    raise ValueError(f"{name} must be [{n}, {shape[0]}] (one row per embeddings row), got "
                                     f"{tuple(mask.shape)}")
                return mask.to(device=ref.device, dtype=torch.bool)

            out[MASK] = torch.cat([full(mask_pos, ref.shape[0], "the prompt's attention mask"),
                                   full(mask_neg, x.shape[0], "nag_negative_prompt_attention_mask")])
        return type(result)(out) if isinstance(result, tuple) else out


KANDINSKY6 = Kandinsky6Family(
    name="Kandinsky 6",
    models=(Kandinsky6Transformer3DModel,),
    token_order="cross_attention",
    acts_in="the text cross-attention of the video and the audio stream in every fused block (the text blocks run "
            "per branch; pooled text vector and modulation stay positive)",
    processors={Kandinsky6Attention: NAGKandinsky6AttnProcessor},
    forward_patches=(ForwardPatch(_text_block_forward, _text_blocks),),
    guided_attention=lambda name, module: name.endswith("dec_block.cross_attention"),
    prompts=Kandinsky6Prompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_attention_mask": MASK},
        optional=("nag_negative_prompt_attention_mask",),
        per_branch=(0, MASK),
        forwarded=("device", "dtype", "num_videos_per_prompt", "max_sequence_length"),
        per_image_arg="num_videos_per_prompt",
        negative_kwargs=(("do_classifier_free_guidance", False),),  # the NAG negative needs no CFG negative
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    per_branch=("encoder_attention_mask",),
    attention_kwargs=None,  # the model's forward takes none
    passes_attention_kwargs=False,
    modes=("exact",),
    check=_check,
)
register_family(KANDINSKY6)
