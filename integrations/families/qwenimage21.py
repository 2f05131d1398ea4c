"""NAG for ``QwenImage21Transformer2DModel`` (Qwen-Image 2.1 and 2.1 Turbo): docs/families/qwenimage21.md.

Qwen-Image 2.1 is single-stream and block-causal: one joint sequence ``[prefix ; target]`` per sample, where the
prefix is the prompt's text with the condition images' latent tokens spliced in at the vision slots of the Qwen3-VL
encoding (``img_mask``), and the target is the image being denoised. Prefix tokens attend causally (each condition
image bidirectionally within itself); target tokens attend to the whole prefix and to each other. The modulation
comes from the timestep only (with ``causal_condition`` the prefix reads the ``t = 0`` row), so the target stream of
the two branches of a 2B layout stays identical: it is kept once, at batch ``B``.

A guided forward (``encoder_hidden_states`` / ``encoder_hidden_states_mask`` ``2B`` rows, positive then NAG-negative;
``hidden_states``, ``timestep``, ``img_shapes``, ``img_mask`` for ``B`` samples; ``guided.pre_hook`` checks the batches
and calls ``QwenImage21Family.deliver``):

- ``deliver`` packs the two branches along the sequence, so the stock model forward runs unchanged at batch ``B``:
  text ``[B, 2T]`` (positive, then negative), ``img_mask`` ``[prefix slots x 2 ; target slots]`` from its first row
  (the stock model reads only that row), the condition latents twice, ``img_shapes`` with the condition images
  twice. The joint sequence is then ``[prefix_pos (P) ; prefix_neg (P) ; target (N)]``; the per-token layers (input
  projections, norms, modulation, MLP, gates) see every token once. It hands the processors a
  ``QwenImage21Forward`` record (``P``, ``N``, whether the step decodes from the KV cache) per thread.
- ``_rope_forward`` (the model's ``pos_embed``) gives both prefixes the prompt layout's positions and the target its
  position after one prefix (the packed sequence would otherwise shift them).
- ``NAGQwenImage21AttnProcessor`` wraps each stock ``QwenImage21AttnProcessor``: prefix queries of each branch
  attend to their own prefix, block-causally, as the stock prefill does (one attention call per prefix segment, both
  branches in one batch of ``2B``); target queries attend over the target keys (once) and each branch's prefix keys,
  LSE-merged with the NAG combine fused in (``split_attention.image_attention``; with a non-PyTorch attention
  backend the unsplit per-branch attention, then the combine). With the KV cache, the extracting step stores both
  branches' prefix keys and values (``[2B, P]``, positive rows first) and the decoding steps read them; a plain step
  on such a cache (after ``nag_end``) reads its positive half, so nothing is recomputed.
- ``_norm_out_forward`` drops the NAG-negative prefix before ``norm_out``: the forward returns ``[B, P + N, C]`` (the
  positive prefix and the target), like a plain forward.

Plain forwards (no record) are the stock computation: every patched piece passes them through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21Attention,
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVLayerCache,
    QwenImage21Transformer2DModel,
    _qwenimage21_prepare_qkv,
)

from .. import call_state, forward_patch
from ..family import Family, ForwardPatch
from ..guided import NAGForward, as_kwargs
from ..modular_spec import ModularSpec
from ..parallel import tp_group_of
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, image_attention

PIPELINES = {"QwenImage21Pipeline": {}}
VLM_TOKENS_PER_SLOT = 4  # one Qwen3-VL image slot stands for 2 x 2 latent tokens (the model's _IMG_TOKENS_PER_SLOT)
BRANCH_ROWS = "_nag_branch_rows"  # on a KV layer cache filled by a guided forward: its latent rows B (it holds 2B)


@dataclasses.dataclass(frozen=True)
class QwenImage21Forward(NAGForward):
    """The record of one guided forward: ``NAGForward`` plus the packed layout. ``prefix``: ``P``, the tokens of one
    branch's prefix in the joint sequence (text positions, plus 4 per condition-image slot); ``target``: ``N``, the
    target image's tokens; ``cached``: the forward decodes from the KV cache (its sequence is the target alone)."""

    prefix: int = 0
    target: int = 0
    cached: bool = False


def _record():
    record = call_state.record()
    return record if isinstance(record, QwenImage21Forward) else None


def _layout(kw: dict) -> tuple[list, int, int]:
    """``(img_shapes[0] as a list, condition tokens, target tokens)`` of a forward's arguments."""
    shapes = kw.get("img_shapes")
    if not isinstance(shapes, (list, tuple)) or not shapes or not isinstance(shapes[0], (list, tuple)) or not shapes[0]:
        raise ValueError("img_shapes must be a list (one entry per sample) of lists of (frame, height, width), "
                         f"condition images first and the target image last, got {shapes!r}")
    layout = [tuple(int(n) for n in shape) for shape in shapes[0]]
    cond = sum(math.prod(shape) for shape in layout[:-1])
    return layout, cond, math.prod(layout[-1])


# --------------------------------------------------------------------------------------------------------------------
# The attention


def _positive_half(layer_cache, batch: int, mode):
    """The layer cache a plain forward of ``batch`` rows reads: the positive half of one that a guided forward
    filled (``[2B, P]`` -> ``[B, P]``: NAG off past ``nag_end``, nothing recomputed); a plain extraction drops the
    guided marker (the stock processor overwrites the tensors). Any other cache as it is."""
    if layer_cache is None:
        return None
    rows = getattr(layer_cache, BRANCH_ROWS, None)
    if rows is None:
        return layer_cache
    if mode == "extract":
        delattr(layer_cache, BRANCH_ROWS)
        return layer_cache
    if mode != "cached" or rows != batch:
        return layer_cache
    half = QwenImage21KVLayerCache()
    half.store(layer_cache.k[:batch], layer_cache.v[:batch])
    return half


def _branch_segments(segments, prefix: int) -> list[tuple[int, int, bool]]:
    """One branch's prefix segments from the stock ones of the packed ``2P`` prefix: those starting before ``P``,
    clipped at ``P`` (the positive prefix's last text run and the negative's first one are one run in the packed
    sequence)."""
    return [(start, min(end, prefix), is_text) for start, end, is_text in segments if start < prefix]


class NAGQwenImage21AttnProcessor(NAGProcessor):
    """``QwenImage21AttnProcessor`` with NAG: plain calls go to the wrapped stock processor (a KV cache filled by a
    guided forward seen through its positive half), guided calls (a ``QwenImage21Forward`` record on this thread) run
    the block-causal attention of both branches with the target queries split, merged and NAG-combined. Same
    ``__call__`` signature as the stock processor."""

    stock = QwenImage21AttnProcessor

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        nag = _record()
        if nag is None:
            layer_cache = _positive_half(layer_cache, hidden_states.shape[0], kv_cache_mode)
            return self.inner(attn, hidden_states, attention_mask=attention_mask, rotary_emb=rotary_emb,
                              layer_cache=layer_cache, kv_cache_mode=kv_cache_mode,
                              cache_write_slice=cache_write_slice, segments=segments, key_valid=key_valid)
        batch, prefix = nag.batch, nag.prefix
        q, k, v, _ = _qwenimage21_prepare_qkv(attn, hidden_states, rotary_emb, None, None, None)  # [B, S, H, D]
        if nag.cached:  # the target's queries and keys; both branches' prefix keys from the cache
            if getattr(layer_cache, BRANCH_ROWS, None) != batch:
                raise RuntimeError(
                    "NAG cannot decode this guided step from its KV cache: the cache does not hold both branches' "
                    f"prefixes for {batch} latent rows (it was filled by a plain forward, or for another batch). "
                    "Fill it with a guided forward (kv_cache_mode='extract' with the NAG negative's rows), or call "
                    "without kv_cache"
                )
            text_k, text_v = layer_cache.get()  # [2B, P, H, D]
            valid = None
            if attention_mask is not None:  # [B, 1, 1, 2P + N] over the packed sequence
                keys = attention_mask.reshape(batch, -1).to(torch.bool)
                valid = torch.cat([keys[:, :prefix], keys[:, prefix : 2 * prefix]])
            text = None
        else:
            branches = lambda x: torch.cat([x[:, :prefix], x[:, prefix : 2 * prefix]])  # noqa: E731  [2B, P, ...]
            text_q, text_k, text_v = branches(q), branches(k), branches(v)
            q, k, v = q[:, 2 * prefix :], k[:, 2 * prefix :], v[:, 2 * prefix :]
            valid = None if key_valid is None else branches(key_valid.to(torch.bool))
            text = self._prefix(text_q, text_k, text_v, _branch_segments(segments or [], prefix), valid)
            if layer_cache is not None and kv_cache_mode == "extract":
                layer_cache.store(text_k, text_v)  # new tensors (torch.cat), no view of the step's K/V
                setattr(layer_cache, BRANCH_ROWS, batch)
        image = self._target(q, k, v, text_k, text_v, valid, nag)  # [B, N, C]
        out = image if text is None else torch.cat([text[:batch], text[batch:], image], dim=1)
        out = attn.to_out[0](out.to(q.dtype))
        return attn.to_out[1](out)

    def _prefix(self, q, k, v, segments, valid):
        """The stock prefill's prefix attention for both branches at once (``[2B, P, H, D]`` -> ``[2B, P, C]``):
        each segment's queries over the keys up to its end, text segments with a causal triangle over their own keys,
        masked text keys dropped."""
        outputs = []
        for start, end, is_text in segments:
            seg_mask = None
            if is_text:
                length = end - start
                seg_mask = torch.cat(
                    [torch.ones(length, start, dtype=torch.bool, device=q.device),
                     torch.tril(torch.ones(length, length, dtype=torch.bool, device=q.device))], dim=1
                )[None, None]
            if valid is not None:
                seg_valid = valid[:, None, None, :end]
                seg_mask = seg_valid if seg_mask is None else (seg_mask & seg_valid)
            outputs.append(dispatch_attention_fn(q[:, start:end], k[:, :end], v[:, :end], attn_mask=seg_mask,
                                                 dropout_p=0.0, backend=None, parallel_config=self._parallel_config))
        return torch.cat(outputs, dim=1).flatten(2, 3).type_as(q)

    def _target(self, q, k, v, text_k, text_v, valid, nag):
        """NAG-combined attention of the target queries ``[B, N, H, D]`` over the target keys and each branch's
        prefix keys ``[2B, P, H, D]`` (``valid``: ``[2B, P]`` bool or None) -> ``[B, N, C]``."""
        if self.backend_is_torch():
            return image_attention(q, k, v, text_k, text_v, nag, text_mask=valid)
        batch = q.shape[0]
        mask = None
        if valid is not None:
            mask = torch.cat([valid, valid.new_ones(valid.shape[0], k.shape[1])], dim=1)[:, None, None, :]
        out = self.attend(torch.cat([q, q]), branch_join(text_k, k), branch_join(text_v, v), mask)  # [2B, N, C]
        return combine(out[:batch].contiguous(), out[batch:].contiguous(), nag)


# --------------------------------------------------------------------------------------------------------------------
# The model's RoPE and final norm in a guided forward


def _rope_forward(self, *args, **kwargs):
    """``pos_embed.forward``: in a guided forward, the positions of the prompt's layout ``[prefix ; target]`` with
    the prefix's rows repeated for the NAG negative's prefix (the packed sequence ``[prefix ; prefix ; target]``)."""
    nag = _record()
    if nag is None:
        return forward_patch.call_previous(self, *args, **kwargs)
    kw = as_kwargs(self._nag_names, args, kwargs)
    shapes, mask, prefix = list(kw["img_shapes"]), kw["image_pad_mask"], nag.prefix
    conditions = (len(shapes) - 1) // 2
    kw["img_shapes"] = shapes[:conditions] + shapes[-1:]
    kw["image_pad_mask"] = torch.cat([mask[:prefix], mask[2 * prefix :]])
    freqs = forward_patch.call_previous(self, **kw)  # [P + N, D / 2]
    return torch.cat([freqs[:prefix], freqs])


def _norm_out_forward(self, *args, **kwargs):
    """``norm_out.forward``: in a guided prefill, drop the NAG-negative prefix first (the forward returns the
    positive prefix and the target, ``[B, P + N, C]``, like a plain one)."""
    nag = _record()
    if nag is None or nag.cached:
        return forward_patch.call_previous(self, *args, **kwargs)
    kw = as_kwargs(self._nag_names, args, kwargs)
    prefix, x, mask = nag.prefix, kw["hidden_states"], kw.get("target_token_mask")
    kw["hidden_states"] = torch.cat([x[:, :prefix], x[:, 2 * prefix :]], dim=1)
    if mask is not None:
        kw["target_token_mask"] = torch.cat([mask[:prefix], mask[2 * prefix :]])
    return forward_patch.call_previous(self, **kw)


# --------------------------------------------------------------------------------------------------------------------
# The family


def _check(model, kw: dict, batch: int) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, QwenImage21Attention):
            continue
        processor = module.processor
        inner = getattr(processor, "inner", processor)
        if isinstance(inner, QwenImage21FlexAttnProcessor):
            raise NotImplementedError(
                f"NAG cannot guide this call: {name} uses QwenImage21FlexAttnProcessor; NAG supports Qwen-Image 2.1's "
                "default QwenImage21AttnProcessor (the segment-wise prefill). Set it back with "
                "transformer.set_attn_processor(QwenImage21AttnProcessor()) and call apply_nag again, or call without "
                "NAG arguments"
            )
        if getattr(processor, "_parallel_config", None) is not None or tp_group_of(module) is not None:
            raise NotImplementedError(
                "NAG cannot guide this call under diffusers' parallelism (a parallel config is set, or the attention "
                "is tensor-parallel): diffusers has no context-parallel plan (_cp_plan) for "
                "QwenImage21Transformer2DModel, and NAG's Qwen-Image 2.1 integration runs on one process only. "
                "Call without NAG arguments, or run NAG without enable_parallelism / parallel_config"
            )
    if model.gradient_checkpointing and torch.is_grad_enabled():
        raise NotImplementedError(
            "NAG cannot guide a Qwen-Image 2.1 forward under gradient checkpointing with gradients on: the recomputed "
            "blocks would not see the guided forward's record. Disable gradient checkpointing "
            "(transformer.disable_gradient_checkpointing()) or run the guided forward under torch.no_grad()"
        )
    text, latents, img_mask = kw["encoder_hidden_states"], kw["hidden_states"], kw.get("img_mask")
    layout, cond, target = _layout(kw)
    if not isinstance(img_mask, torch.Tensor) or img_mask.dim() != 2:
        raise ValueError("img_mask must be a [samples, text tokens + target tokens / 4] bool tensor (the vision slots "
                         f"of the joint sequence; its first row is read), got {type(img_mask).__name__}")
    slots = text.shape[1] + target // VLM_TOKENS_PER_SLOT
    if img_mask.shape[1] != slots:
        raise ValueError(
            f"img_mask must cover the joint sequence of the prompt's layout: {text.shape[1]} text positions (the "
            f"encoder_hidden_states length, shared by the positive and the NAG-negative rows) + {target // 4} target "
            f"slots = {slots} columns, got {img_mask.shape[1]}; encode the NAG negative with the prompt's layout "
            "(the prompt's length, condition images at the same positions)"
        )
    if latents.shape[1] != cond + target:
        raise ValueError(f"hidden_states must hold {cond + target} tokens for img_shapes {layout} (condition images "
                         f"first, the target last), got {latents.shape[1]}")


class QwenImage21Family(Family):
    """Qwen-Image 2.1's family: the guided forward's two branches are packed along the sequence (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        batch = record.batch
        text, mask, img_mask = kw[self.text], kw.get("encoder_hidden_states_mask"), kw["img_mask"]
        layout, cond, target = _layout(kw)
        text_len = text.shape[1]
        prefix = text_len + (VLM_TOKENS_PER_SLOT - 1) * (cond // VLM_TOKENS_PER_SLOT)
        cached = kw.get("kv_cache") is not None and kw.get("kv_cache_mode") == "cached"
        if cached:
            cache = kw["kv_cache"].get_layer(0)
            if getattr(cache, BRANCH_ROWS, None) != batch:
                raise RuntimeError(
                    "NAG cannot decode this guided step from kv_cache: it does not hold both branches' prefixes for "
                    f"{batch} latent rows (it was filled by a plain forward, or for another batch). Fill it with a "
                    "guided forward (kv_cache_mode='extract' with the NAG negative's rows), or call without kv_cache"
                )
        kw[self.text] = torch.cat([text[:batch], text[batch:]], dim=1)  # [B, 2T, D]
        if mask is not None:
            kw["encoder_hidden_states_mask"] = torch.cat([mask[:batch], mask[batch:]], dim=1)
        slots = img_mask[:1, :text_len]
        kw["img_mask"] = torch.cat([slots, slots, img_mask[:1, text_len:]], dim=1)
        latents = kw[self.latents]
        kw[self.latents] = torch.cat([latents[:, :cond], latents[:, :cond], latents[:, cond:]], dim=1)
        packed = layout[:-1] * 2 + layout[-1:]
        kw["img_shapes"] = [packed] * len(kw["img_shapes"])
        fields = {field.name: getattr(record, field.name) for field in dataclasses.fields(NAGForward)}
        super().deliver(kw, extra, QwenImage21Forward(**fields, prefix=prefix, target=target, cached=cached))


class QwenImage21Prompts(PromptAdapter):
    """``QwenImage21Pipeline.encode_prompt`` returns ``(embeds, mask or None, image_pad_mask)``: each prompt at its own
    length (right-padded in a batch) and the vision slots of the condition images in ``image_pad_mask`` (one row per
    prompt; the model reads the first). Both branches of a guided forward share that layout, and the prompt keeps it
    exactly: the NAG negative, encoded with the same condition images (its vision slots then sit at the prompt's
    positions: the images precede the text in the template), is fitted to the prompt's length: padded (masked) when
    shorter, cut to it when longer (with a warning). The prompt's rows, mask and ``image_pad_mask`` are unchanged, so
    a plain step of a NAG call (past ``nag_end``) is the stock step."""

    def encode_negative(self, encode, encode_args: dict, result, negatives: dict) -> dict:
        given = any(negatives.get(name) is not None for name in self.embeds)
        if given and encode_args.get("image") is not None:
            raise ValueError(
                "nag_negative_prompt_embeds cannot be combined with condition images (image): the NAG negative must be "
                "laid out like the prompt, with the images' vision slots at the same positions. Pass "
                "nag_negative_prompt (text): the pipeline encodes it with the condition images"
            )
        return super().encode_negative(encode, encode_args, result, negatives)

    def append(self, result, negative: dict):
        embeds, mask, layout = result[0], result[1], result[2]
        n_embeds, n_mask, n_layout = negative[0], negative.get(1), negative.get(2)
        if n_embeds.dim() != 3 or n_embeds.shape[2:] != embeds.shape[2:]:
            raise ValueError(f"nag_negative_prompt_embeds must be [rows, tokens, {embeds.shape[-1]}] like the "
                             f"prompt's, got {tuple(n_embeds.shape)}")
        length, own = embeds.shape[1], n_embeds.shape[1]
        n_mask = torch.ones(n_embeds.shape[:2], dtype=torch.long, device=n_embeds.device) if n_mask is None else n_mask
        if n_mask.shape != n_embeds.shape[:2]:
            raise ValueError(f"nag_negative_prompt_embeds_mask must have shape {tuple(n_embeds.shape[:2])}, got "
                             f"{tuple(n_mask.shape)}")
        if own > length:
            warnings.warn(
                f"the NAG negative has {own} tokens, more than the prompt's {length}: Qwen-Image 2.1 runs both "
                f"branches over the prompt's layout, so the negative is cut to its first {length} tokens. Shorten "
                "nag_negative_prompt (or write a longer prompt) to keep all of it",
                stacklevel=2,
            )
        pad = max(0, length - own)
        n_embeds = torch.nn.functional.pad(n_embeds[:, :length], (0, 0, 0, pad))
        n_mask = torch.nn.functional.pad(n_mask[:, :length].to(torch.long), (0, pad))
        if layout is not None and n_layout is not None:
            n_layout = n_layout[:, :length].to(device=layout.device, dtype=torch.bool)
            n_layout = torch.nn.functional.pad(n_layout, (0, pad))
            if not bool((n_layout == layout[:1].to(torch.bool)).all()):
                raise ValueError(
                    "the NAG negative's condition-image slots must sit at the prompt's positions (Qwen-Image 2.1 "
                    "reads one layout for both branches); encode it with the same condition images"
                )
        own_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        joined_mask = torch.cat([own_mask.to(torch.long), n_mask.to(own_mask.device)])
        out = list(result)
        out[0] = torch.cat([embeds, n_embeds.to(device=embeds.device, dtype=embeds.dtype)])
        out[1] = None if bool(joined_mask.all()) else joined_mask
        return type(result)(out) if isinstance(result, tuple) else out


QWENIMAGE21 = QwenImage21Family(
    name="Qwen-Image 2.1",


    modular=ModularSpec(


        model_names=("qwenimage21", "qwenimage21-turbo"),


        outputs={0: "prompt_embeds", 1: "prompt_embeds_mask", 2: "image_pad_mask"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"},


        pipelines={"QwenImage21AutoBlocks": "QwenImage21Pipeline", "QwenImage21TurboAutoBlocks": "QwenImage21Pipeline"},


    ),
    models=(QwenImage21Transformer2DModel,),
    token_order="text_first",
    acts_in="the attention of the target image's tokens in every block, over the target and each branch's own "
    "block-causal prefix (text with condition images); the target stream shared by both branches (exact: the "
    "modulation depends on the timestep only)",
    processors={QwenImage21Attention: NAGQwenImage21AttnProcessor},
    forward_patches=(
        ForwardPatch(_rope_forward, lambda model: (model.pos_embed,)),
        ForwardPatch(_norm_out_forward, lambda model: (model.norm_out,)),
    ),
    prompts=QwenImage21Prompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_embeds_mask": 1},
        optional=("nag_negative_prompt_embeds_mask",),  # None: every token counts, as encode_prompt returns it
        per_branch=(0, 1, 2),  # 2: image_pad_mask (the prompt's, unchanged; the negative's checked against it)
        forwarded=("device", "num_images_per_prompt", "image"),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    per_branch=("encoder_hidden_states_mask",),
    timestep_scale=1000.0,
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    modes=("exact",),
    check=_check,
)
register_family(QWENIMAGE21)
