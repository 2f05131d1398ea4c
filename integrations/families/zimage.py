"""NAG for ``ZImageTransformer2DModel`` (Z-Image, Z-Image-Turbo): docs/families/zimage.md.

Z-Image modulates every token from the timestep only, so in the authors'-style 2B layout the two branches' image
tokens stay identical through every joined layer: the shared image stream computes exactly that result at the cost
of duplicating the caption alone. Both mode names run it.

One guided forward (``x``: B latents, ``cap_feats``: 2B captions = the B positive then the B NAG-negative, ``t``: B;
``guided.pre_hook`` checks the batches and calls ``ZImageFamily.deliver``, which appends the call's ``NAGForward``
to the caption list: an element, not an attribute, so it survives the copies that offloading hooks make of inputs):

- ``_patchify``: the stock ``patchify_and_embed`` on the B positive pairs, and on the negative captions for their
  caption tokens; the image positions are the positive caption's (as in a plain call). The noise refiner then runs
  on the B images as usual, the context refiner on all 2B captions (each padded to its own multiple of 32).
- ``_unified``: instead of the stock ``[x ; cap]`` rows, one row per image ``[x ; cap_pos ; cap_neg]``
  (``B, N + Tp + Tn``: ``Tp``/``Tn`` the longest positive/negative caption), and as the layers' attention mask a
  ``Layout`` naming the parts and each caption's length. The stock layers run on it: their modulation has ``B``
  rows, their norms and MLPs act per token, the final layer keeps the first ``N`` tokens as usual.
- ``NAGZImageAttnProcessor`` (wrapping ``ZSingleStreamAttnProcessor``), given a ``Layout``: caption queries of each
  branch attend over ``[image ; own caption]`` (the user's attention backend); image queries attend once over the
  image keys and per branch over that branch's caption keys (only its own length: no padding, no mask), and
  ``nag_merge`` LSE-merges the parts and NAG-combines the branches in one pass.

A negative caption of another length than the prompt's needs nothing more: each caption part is cut to its own
length. Everything else (refiners, plain calls, unguided layers) is the stock code.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel, ZSingleStreamAttnProcessor

import nag_kernels
from nag_kernels.attention import attention_with_lse

from .. import call_state
from ..family import Family, MethodPatch
from ..guided import NAGForward
from ..modular_spec import ModularSpec, join_lists
from ..pipeline import PromptAdapter, per_prompt
from ..processor import NAGProcessor
from ..registry import register_family

PIPELINES = {"ZImagePipeline": {}, "ZImageImg2ImgPipeline": {}, "ZImageInpaintPipeline": {}}
# Per-thread slots (call_state): the guided forward's record, from _patchify to _unified (consumed there), and
# whether a forward carried NAG-negative captions (set by _check, read and cleared by _patchify).
_RECORD = "zimage_record"
_ROWS = "zimage_rows"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The packed rows ``[image ; positive caption ; negative caption]`` of a guided forward, passed to the joined
    layers as their attention mask. ``image``: N tokens (one size for the batch); ``positive``/``negative``: each
    row's caption length (the parts are as long as the longest of their captions)."""

    nag: NAGForward
    image: int
    positive: tuple[int, ...]
    negative: tuple[int, ...]


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotation (as ``ZSingleStreamAttnProcessor``): ``x [B, S, H, D]``, complex ``freqs [B, S, D/2]``."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def _rows(fn, q, k, v, lengths: tuple[int, ...]):
    """``fn(q, k, v)`` per row on each row's first ``lengths[i]`` keys (all rows at once when they are equal)."""
    if len(set(lengths)) == 1:
        return fn(q, k[:, : lengths[0]], v[:, : lengths[0]])
    parts = [fn(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n]) for i, n in enumerate(lengths)]
    return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)


class NAGZImageAttnProcessor(NAGProcessor):
    """``ZSingleStreamAttnProcessor`` with NAG: a ``Layout`` as attention mask marks a guided joined layer; every
    other call (refiners, plain forwards) goes to the wrapped stock processor."""

    stock = ZSingleStreamAttnProcessor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if not isinstance(attention_mask, Layout):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if self._parallel_config is not None:
            raise NotImplementedError(
                "NAG on Z-Image does not support context parallelism yet; call without NAG arguments or disable the "
                "parallel config"
            )
        layout, nag = attention_mask, attention_mask.nag
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _rope(q, freqs_cis), _rope(k, freqs_cis)
        n, tp = layout.image, max(layout.positive)
        parts = (slice(0, n), slice(n, n + tp), slice(n + tp, None))
        (qi, ki, vi), (qp, kp, vp), (qn, kn, vn) = ((q[:, s], k[:, s], v[:, s]) for s in parts)
        image = self._image(qi, ki, vi, (kp, vp, layout.positive), (kn, vn, layout.negative), nag)
        texts = [self._text(qt, ki, vi, kt, vt, lengths) for qt, kt, vt, lengths in
                 ((qp, kp, vp, layout.positive), (qn, kn, vn, layout.negative))]
        out = torch.cat([image, *texts], dim=1).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out

    @staticmethod
    def _image(q, k, v, positive, negative, nag: NAGForward) -> torch.Tensor:
        """Image queries ``[B, N, H, D]``: NAG-combined attention over ``[image ; caption_b]``, split and merged."""
        o_image, lse_image = attention_with_lse(q, k, v)
        (o_pos, lse_pos), (o_neg, lse_neg) = (
            _rows(attention_with_lse, q, tk, tv, n) for tk, tv, n in (positive, negative)
        )
        out = nag_kernels.nag_merge(
            o_image, lse_image, o_pos, lse_pos, o_neg, lse_neg, nag.scale, nag.tau, nag.alpha,
            norm=nag.norm, backend=nag.backend,
        )
        return out.flatten(2, 3)

    def _text(self, q, ki, vi, k, v, lengths: tuple[int, ...]) -> torch.Tensor:
        """One branch's caption queries ``[B, T, H, D]`` over ``[image ; own caption]`` -> ``[B, T, H * D]``; the
        queries past a row's length (padding, never read) get zeros."""
        if len(set(lengths)) == 1:
            n = lengths[0]
            return self.attend(q[:, :n], torch.cat([ki, k[:, :n]], 1), torch.cat([vi, v[:, :n]], 1))
        out = q.new_zeros(*q.shape[:2], q.shape[2] * q.shape[3])
        for i, n in enumerate(lengths):
            keys = torch.cat([ki[i : i + 1], k[i : i + 1, :n]], 1)
            values = torch.cat([vi[i : i + 1], v[i : i + 1, :n]], 1)
            out[i : i + 1, :n] = self.attend(q[i : i + 1, :n], keys, values)
        return out


def _patchify(self, all_image, all_cap_feats, patch_size, f_patch_size):
    """``patchify_and_embed`` of a guided forward: the B images with the positive captions (their positions), and
    the B negative captions' tokens; the caption lists get 2B entries."""
    stock = type(self).patchify_and_embed
    call_state.take(_RECORD)
    had_rows = call_state.take(_ROWS, False)
    if not (all_cap_feats and isinstance(all_cap_feats[-1], NAGForward)):
        if call_state.call_config() is not None and not had_rows:
            warnings.warn(
                "NAG did not act in this step of a Z-Image pipeline call with NAG arguments: the transformer got no "
                "NAG-negative captions. The pipelines skip encode_prompt when given prompt_embeds without prompt "
                "(pass prompt= as well), and steps that cfg_truncation runs without CFG carry no NAG rows",
                stacklevel=2,
            )
        return stock(self, all_image, all_cap_feats, patch_size, f_patch_size)
    nag, all_cap_feats = all_cap_feats[-1], all_cap_feats[:-1]
    batch = len(all_image)
    positive = stock(self, all_image, all_cap_feats[:batch], patch_size, f_patch_size)
    x, cap, size, x_ids, cap_ids, x_pad, cap_pad = positive
    _, neg, _, _, neg_ids, _, neg_pad = stock(self, all_image, all_cap_feats[batch:], patch_size, f_patch_size)
    call_state.put(_RECORD, nag)
    return x, cap + neg, size, x_ids, cap_ids + neg_ids, x_pad, cap_pad + neg_pad


def _unified(self, x, x_freqs, x_seqlens, x_noise_mask, cap, cap_freqs, cap_seqlens, *args, **kwargs):
    """``_build_unified_sequence`` of a guided forward: rows ``[x ; cap_pos ; cap_neg]`` and a ``Layout`` mask."""
    nag = call_state.take(_RECORD)
    batch = len(x_seqlens)
    if nag is None or len(cap_seqlens) != 2 * batch:
        return type(self)._build_unified_sequence(
            self, x, x_freqs, x_seqlens, x_noise_mask, cap, cap_freqs, cap_seqlens, *args, **kwargs
        )
    if len(set(x_seqlens)) != 1:
        raise ValueError(f"NAG on Z-Image needs latents of one size in a batch, got {len(set(x_seqlens))} sizes")
    n, positive, negative = x_seqlens[0], tuple(cap_seqlens[:batch]), tuple(cap_seqlens[batch:])
    tp, tn = max(positive), max(negative)
    unified = torch.cat([x[:, :n], cap[:batch, :tp], cap[batch:, :tn]], dim=1)
    freqs = torch.cat([x_freqs[:, :n], cap_freqs[:batch, :tp], cap_freqs[batch:, :tn]], dim=1)
    return unified, freqs, Layout(nag, n, positive, negative), None


def _check(model, kw: dict, batch: int) -> None:
    call_state.put(_ROWS, True)  # NAG rows arrived (a step past nag_end drops them before _patchify sees them)
    x = kw["x"]
    if isinstance(x[0], list) or kw.get("siglip_feats") is not None:
        raise NotImplementedError("NAG does not support Z-Image's omni mode (lists of images, siglip_feats) yet")
    if kw.get("controlnet_block_samples") is not None:
        raise NotImplementedError("NAG does not support Z-Image ControlNet residuals (controlnet_block_samples) yet")


class ZImageFamily(Family):
    """Z-Image's family: per-sample lists; the guided record travels in the caption list (module docstring)."""

    def text_len(self, text) -> int:
        return max(len(c) for c in text)

    def deliver(self, kw: dict, extra: dict, record) -> None:
        kw[self.text] = [*kw[self.text], record]  # _patchify takes it off again
        if extra:
            kw[self.attention_kwargs] = extra  # e.g. the LoRA scale; the record itself travels with the captions


class ZImagePrompts(PromptAdapter):
    """Z-Image pipelines encode a prompt into a list of ``[L_i, D]`` tensors (each prompt its own length) and return
    ``(prompt_embeds, negative_prompt_embeds)`` from one ``encode_prompt`` call, batching CFG's rows behind the
    prompt's. The NAG negative's rows follow the prompt's: ``[positive ; NAG negative]`` without CFG; with CFG the
    CFG negatives are listed as ``[cfg ; NAG negative ; cfg]`` so that the model call's captions are ``[positive ;
    cfg ; NAG negative ; cfg]`` for latents ``[cond ; uncond]``: the guided layout, the unconditional rows guided by
    their own caption (identity up to rounding)."""

    def check(self, negatives: dict) -> None:
        for name in self.prompts:
            value = negatives.get(name)
            if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value)):
                raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
        embeds = negatives.get("nag_negative_prompt_embeds")
        if embeds is not None:
            if negatives.get("nag_negative_prompt") is not None:
                raise ValueError("give either nag_negative_prompt or nag_negative_prompt_embeds, not both")
            items = embeds if isinstance(embeds, list) else [embeds]
            if not items or not all(isinstance(e, torch.Tensor) and e.dim() == 2 for e in items):
                raise TypeError("nag_negative_prompt_embeds must be a [L, D] tensor or a list of them (one per prompt)")

    def encode_negative(self, encode, encode_args: dict, result, negatives: dict) -> dict:
        prompts = len(result[0])
        embeds = negatives.get("nag_negative_prompt_embeds")
        if embeds is not None:
            items = embeds if isinstance(embeds, list) else [embeds]
            if len(items) not in (1, prompts):
                raise ValueError(f"nag_negative_prompt_embeds must have 1 or {prompts} entries, got {len(items)}")
            return {0: list(items) * (prompts // len(items))}
        kwargs = {key: encode_args[key] for key in self.forwarded if key in encode_args}
        negative = per_prompt("nag_negative_prompt", negatives.get("nag_negative_prompt") or "", prompts)
        encoded, _ = encode(prompt=negative, do_classifier_free_guidance=False, **kwargs)
        return {0: encoded}

    def append(self, result, negative: dict):
        positive, cfg = result
        ref = positive[0]
        rows = [e.to(device=ref.device, dtype=ref.dtype) for e in negative[0]]
        if any(e.shape[-1] != ref.shape[-1] for e in rows):
            raise ValueError(f"the NAG negative's embeddings must have width {ref.shape[-1]} like the prompt's")
        if cfg:  # CFG batches [positive ; cfg] with latents [cond ; uncond]
            return list(positive), list(cfg) + rows + list(cfg)
        return list(positive) + rows, cfg


def _sigma(t: torch.Tensor) -> torch.Tensor:
    """Z-Image takes ``t = 1 - sigma``; ``nag_end`` is tested on ``sigma`` (times 1000: the scheduler timestep)."""
    return 1 - t.reshape(-1)[0]


ZIMAGE = ZImageFamily(
    name="Z-Image",


    modular=ModularSpec(


        model_names=("z-image",),


        outputs={0: "prompt_embeds"},


        guider_inputs={"prompt_embeds": "cap_feats"},


        join=join_lists,


    ),
    models=(ZImageTransformer2DModel,),
    token_order="image_first",
    acts_in="the joint attention of the single-stream layers (image outputs), after the unguided noise refiner "
    "and the per-branch context refiner; the image stream shared by both branches (exact: the modulation does "
    "not depend on the text)",
    processors={Attention: NAGZImageAttnProcessor},
    method_patches=(MethodPatch("patchify_and_embed", _patchify), MethodPatch("_build_unified_sequence", _unified)),
    prompts=ZImagePrompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        forwarded=("device", "max_sequence_length"),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    latents="x",
    text="cap_feats",
    timestep="t",
    timestep_scale=1000.0,
    timestep_value=_sigma,
    check=_check,
)
register_family(ZIMAGE)
