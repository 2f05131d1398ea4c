"""NAG for ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5 text-to-video and image-to-video):
docs/families/hunyuanvideo15.md.

Every block is a dual-stream block over ``[video, text]`` whose modulation depends on the timestep only (plus
``timestep_r`` on MeanFlow checkpoints), never on the text. The text stream is built before the blocks, per row: the
Qwen2.5-VL states through a token refiner (self-attention with the text mask, modulated by the timestep and the
masked mean of the text), the ByT5 glyph states through a projection, the SigLIP image tokens (zeros and masked out
for text-to-video) through another, then each row's valid tokens are moved to the front (image, ByT5, Qwen; the
padding after them, masked). So the NAG negative's text stream is its own computation, row by row; the video stream
is the same in both branches (the authors'-style 2B layout would keep two identical copies of it), so it stays at
``B`` rows and only the attention of the video queries differs per branch.

A guided forward has ``B`` video rows and ``2B`` rows of ``encoder_hidden_states``, ``encoder_attention_mask``,
``encoder_hidden_states_2`` and ``encoder_attention_mask_2`` (positive, then NAG-negative). The stock forward builds
the text stream of each row and the image tokens' mask from the video batch, so ``guided.pre_hook`` expands
``hidden_states``, ``timestep``, ``timestep_r`` and ``image_embeds`` to ``2B`` rows (``Family.expand``) and the stock
forward runs unchanged at ``2B`` rows except where the video stream is concerned:

- ``_patch_embed_forward`` (the patch embedding ``x_embedder``): embeds the first ``B`` rows only: the video stream
  has ``B`` rows from there on.
- ``modulation.positive_rows_forward`` on each block's ``norm1``: the video stream's AdaLN takes its own ``B`` rows of
  the ``2B`` timestep embedding (both halves are equal); the text stream's ``norm1_context`` takes all ``2B``.
- ``NAGHunyuanVideo15AttnProcessor`` (wrapping each block's ``HunyuanVideo15AttnProcessor2_0``): video Q/K/V once
  (QK norms, RoPE); text Q/K/V per branch; text queries of branch ``b`` over ``[video ; text_b]`` with that branch's
  key mask (the user's attention backend); video queries split into the video keys (once) and each branch's masked
  text keys, LSE-merged with the NAG combine fused (``split_attention.image_attention``), before ``to_out``. With a
  non-PyTorch attention backend the per-branch attention runs unsplit through that backend, then combines.
- ``_norm_out_forward`` (the final ``norm_out``): the first ``B`` rows of the conditioning, its result repeated to the
  ``2B`` rows the stock forward unpatchifies; ``_output_hook`` (a forward hook on the model) returns the first ``B``.

The model's forward passes no attention kwargs to its blocks, so the record reaches the processors and the patched
forwards per thread (``call_state.record()``, ``Family.passes_attention_kwargs``); under gradient checkpointing the
recomputed blocks get it bound to their call (``guided.carry_record_into_checkpoints``). diffusers 0.42.1 has no
context-parallel plan (``_cp_plan``) for this model: a guided call under a parallel config is refused. Plain forwards
(no record) are the stock computation: every patched forward passes them through unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15Transformer3DModel,
)

from .. import call_state, forward_patch, parallel
from ..family import Family, ForwardPatch
from ..guided import as_kwargs, rows
from ..modular_spec import ModularSpec
from ..modulation import positive_rows_forward
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, heads, image_attention

# Supported pipelines -> the recommended settings that differ from the family's there. Nothing is published for this
# model: the defaults are this project's starting point, by analogy with the dual-stream joint-attention families
# (FLUX.1's double blocks, Qwen-Image).
PIPELINES = {"HunyuanVideo15Pipeline": {}, "HunyuanVideo15ImageToVideoPipeline": {}}
DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}

TEXT, MASK, TEXT_2, MASK_2 = (
    "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")
IMAGE = "image_embeds"


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(
    parallel.refuse_without_plan, model=HunyuanVideo15Transformer3DModel, family="HunyuanVideo 1.5"
)


def _is_guided(nag, hidden_states, encoder_hidden_states) -> bool:
    return (
        nag is not None
        and encoder_hidden_states is not None
        and encoder_hidden_states.shape[0] == 2 * hidden_states.shape[0]
    )


class NAGHunyuanVideo15AttnProcessor(NAGProcessor):
    """``HunyuanVideo15AttnProcessor2_0`` with NAG: a call with a record (``call_state.record()``, set by the model's
    pre-hook) and ``2B`` text rows for ``B`` video rows is guided; every other call goes to the wrapped stock
    processor. Same ``__call__`` signature as the stock processor."""

    stock = HunyuanVideo15AttnProcessor2_0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        nag = call_state.record()
        if not _is_guided(nag, hidden_states, encoder_hidden_states):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        _refuse_parallel(self._parallel_config, "this call")
        # hidden_states [B, N, C] (video, once); encoder_hidden_states [2B, T, C]; attention_mask [2B, T] (text keys).
        batch, video_len = hidden_states.shape[:2]
        head_dim = attn.to_q.out_features // attn.heads
        q, k, v = heads(head_dim, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                        attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        c = encoder_hidden_states
        tq, tk, tv = heads(head_dim, attn.add_q_proj(c), attn.add_k_proj(c), attn.add_v_proj(c),
                           attn.norm_added_q, attn.norm_added_k)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)  # [2B, T]
        key_mask = None
        if mask is not None:  # each branch's keys [video ; text_b]: the video keys always count
            key_mask = F.pad(mask, (video_len, 0), value=True)[:, None, None, :]
        if self.backend_is_torch():
            text = self.attend(tq, branch_join(tk, k, text_first=False), branch_join(tv, v, text_first=False),
                               key_mask)  # [2B, T, C]
            video = image_attention(q, k, v, tk, tv, nag, text_mask=mask)  # [B, N, C], merged and combined
        else:
            out = self.attend(branch_join(tq, q, text_first=False), branch_join(tk, k, text_first=False),
                              branch_join(tv, v, text_first=False), key_mask)
            video, text = out[:, :video_len], out[:, video_len:]
            video = combine(video[:batch], video[batch:], nag)
        video = attn.to_out[0](video.contiguous())
        video = attn.to_out[1](video)
        return video, attn.to_add_out(text.contiguous())


def _patch_embed_forward(self, *args, **kwargs):
    """``forward`` of the patch embedding (``x_embedder``): in a guided forward its input has the ``2B`` rows the
    pre-hook expanded it to (the stock forward sizes the text stream's image-token mask from them); the video stream
    needs ``B``: embed the first ``B`` (both halves are equal). Plain forwards: unchanged."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    nag, x = call_state.record(), kw["hidden_states"]
    if nag is not None and x.shape[0] == 2 * nag.batch:
        kw["hidden_states"] = x[: nag.batch]
    return forward_patch.call_previous(self, **kw)


def _norm_out_forward(self, *args, **kwargs):
    """``forward`` of the final AdaLN (``norm_out``): in a guided forward the video stream has ``B`` rows and the
    conditioning ``2B`` (both halves equal): normalize with the first ``B`` and repeat the result to the ``2B`` rows
    the stock forward unpatchifies (``_output_hook`` returns the first ``B``). Plain forwards: unchanged."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    x, emb = kw["x"], kw["conditioning_embedding"]
    if call_state.record() is None or emb.shape[0] != 2 * x.shape[0]:
        return forward_patch.call_previous(self, **kw)
    out = forward_patch.call_previous(self, x=x, conditioning_embedding=emb[: x.shape[0]])
    return torch.cat([out, out])


def _output_hook(module, args, output):
    """The model's forward hook: a guided forward's output has the ``2B`` rows of the stock unpatchify (both halves
    equal); return the first ``B``. Plain forwards: unchanged (``None``)."""
    nag = call_state.record()
    if nag is None:
        return None
    if isinstance(output, tuple):
        sample = output[0]
        return (sample[: nag.batch], *output[1:]) if sample.shape[0] == 2 * nag.batch else None
    sample = output.sample
    return Transformer2DModelOutput(sample=sample[: nag.batch]) if sample.shape[0] == 2 * nag.batch else None


def _patch(model):
    # prepend: before the core's record-clearing forward hook (api.py registers it after this install)
    return model.register_forward_hook(_output_hook, prepend=True)


def _restore(model, handle) -> None:
    handle.remove()


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs (``batch`` video rows) that the batch rule alone does not catch."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    hidden = kw["hidden_states"]
    if hidden.dim() != 5:
        raise ValueError(f"hidden_states must be [B, C, F, H, W] in a NAG call, got {tuple(hidden.shape)}")
    for text, mask in ((TEXT, MASK), (TEXT_2, MASK_2)):
        x, m = kw.get(text), kw.get(mask)
        if x is None or m is None:
            raise ValueError(f"{text} and {mask} are required in a NAG call (2B rows: positive, then NAG-negative)")
        if x.dim() != 3 or m.shape != x.shape[:2]:
            raise ValueError(f"{mask} must have the shape {tuple(x.shape[:2])} of {text} (rows, tokens), got "
                             f"{tuple(m.shape)}")
    image = kw.get(IMAGE)
    if image is None:
        raise ValueError(f"{IMAGE} is required in a NAG call (zeros for text-to-video, as the pipelines pass)")
    if rows(image) not in (batch, 2 * batch):
        raise ValueError(
            f"{IMAGE} must have one row per video sample ({batch}) or {2 * batch} in a NAG call, got {rows(image)} "
            "(the stock model needs one per sample too: HunyuanVideo15Pipeline passes one per prompt, so it supports "
            "num_videos_per_prompt=1 only)"
        )


class HunyuanVideo15PromptAdapter(PromptAdapter):
    """The pipelines' ``encode_prompt`` returns four tensors (Qwen2.5-VL embeddings and mask, ByT5 embeddings and
    mask), all with one row per video. The positive and the NAG negative of each encoder are padded with masked zeros
    to a common length before they are joined (the pipelines pad to fixed lengths, so only pre-encoded tensors of
    another length need it; masked tokens play no part in the video stream). ``nag_negative_prompt_embeds_mask_2`` is
    a mask too."""

    def check_values(self, negatives: dict) -> None:
        masks = {name: negatives.get(name) for name in self.embeds if name.endswith("_mask_2")}
        super().check_values({**negatives, **dict.fromkeys(masks)})
        for name, value in masks.items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise ValueError(f"{name} is on the meta device (it holds no data); pass a tensor on a real device (it "
                                 "is moved to the pipeline's device)")
            if isinstance(value, torch.Tensor) and value.is_complex():
                raise TypeError(f"{name} must be a bool, integer or floating-point mask, got {value.dtype}")

    def append(self, result, negative: dict):
        names = {index: name for name, index in self.embeds.items()}
        out = list(result)
        for e, m in ((0, 1), (2, 3)):
            embeds, mask, n_embeds, n_mask = result[e], result[m], negative[e], negative[m]
            if n_embeds.dim() != 3 or n_embeds.shape[2] != embeds.shape[2]:
                raise ValueError(f"{names[e]} must be [rows, tokens, {embeds.shape[2]}] like the prompt's, got "
                                 f"{tuple(n_embeds.shape)}")
            if n_mask.shape != n_embeds.shape[:2]:
                raise ValueError(f"{names[m]} must have the shape {tuple(n_embeds.shape[:2])} of {names[e]}, got "
                                 f"{tuple(n_mask.shape)}")
            length = max(embeds.shape[1], n_embeds.shape[1])
            n_embeds = n_embeds.to(device=embeds.device, dtype=embeds.dtype)
            n_mask = n_mask.to(device=mask.device, dtype=mask.dtype)
            out[e] = torch.cat([F.pad(x, (0, 0, 0, length - x.shape[1])) for x in (embeds, n_embeds)])
            out[m] = torch.cat([F.pad(x, (0, length - x.shape[1])) for x in (mask, n_mask)])
        return type(result)(out) if isinstance(result, tuple) else out


HUNYUANVIDEO15 = Family(
    name="HunyuanVideo 1.5",


    modular=ModularSpec(


        model_names=("hunyuan-video-1.5",),


        outputs={0: "prompt_embeds", 1: "prompt_embeds_mask", 2: "prompt_embeds_2", 3: "prompt_embeds_mask_2"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_attention_mask",


                       "prompt_embeds_2": "encoder_hidden_states_2", "prompt_embeds_mask_2": "encoder_attention_mask_2"},


        unconditional=True,  # the stock text-encoder step fails without CFG's embeddings


    ),
    models=(HunyuanVideo15Transformer3DModel,),
    token_order="image_first",
    acts_in="the joint attention of every dual-stream block (video outputs); the text stream (token refiner, ByT5 "
            "and image-token projections, valid-token reordering) runs per branch",
    processors={Attention: NAGHunyuanVideo15AttnProcessor},
    guided_attention=lambda name, module: name.startswith("transformer_blocks."),
    forward_patches=(
        ForwardPatch(_patch_embed_forward, lambda model: (model.x_embedder,)),
        ForwardPatch(positive_rows_forward,
                     lambda model: [(block.norm1, {"_nag_emb": "emb"}) for block in model.transformer_blocks]),
        ForwardPatch(_norm_out_forward, lambda model: (model.norm_out,)),
    ),
    patch=_patch,
    restore=_restore,
    prompts=HunyuanVideo15PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_embeds_mask": 1,
                "nag_negative_prompt_embeds_2": 2, "nag_negative_prompt_embeds_mask_2": 3},
        per_branch=(0, 1, 2, 3),
        positive=("prompt", "prompt_embeds", "prompt_embeds_2"),
        forwarded=("device", "dtype", "batch_size", "num_videos_per_prompt"),
        per_image_arg="num_videos_per_prompt",
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    text=TEXT,
    per_branch=(MASK, TEXT_2, MASK_2),
    expand=("hidden_states", "timestep", "timestep_r", IMAGE),
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    check=_check,
)
register_family(HUNYUANVIDEO15)
