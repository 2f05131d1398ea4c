"""NAG for ``ChromaTransformer2DModel`` (Chroma): docs/families/chroma.md.

FLUX.1's layout (double and single blocks, ``[text, image]``, RoPE) without the pooled CLIP vector and with a text
attention mask. The modulation depends on the timestep only, so the image stream stays at ``B`` rows in every block
and this shared-image-stream computation is exactly the authors' layout (both names of ``mode`` run it).

In a guided forward (``B`` latent rows; ``encoder_hidden_states`` and, when given, ``attention_mask`` ``2B`` rows):

- ``modulation.text_rows_forward`` replaces each double block's ``norm1_context`` ``forward``: the text stream's ``2B`` rows
  share the ``B`` rows of modulation.
- ``NAGChromaAttnProcessor`` (FLUX.1's processor, plus masks) in the double blocks: image Q/K/V once, text queries per
  branch with the branch's rows of the block's mask, image queries split into the image keys (once) and each
  branch's masked text keys, LSE-merged and combined before ``to_out``.
- ``_double_forward`` on the last double block hands the two branches' text to the single stack side by side,
  ``[B, 2T, C]``, so the model's ``cat([text, image])`` gives ``[B, 2T + N, C]`` (positive text, negative text,
  image) and its final ``[:, text_len:]`` slice keeps the image.
- ``_single_forward`` on every single block runs the block on that layout: image ``B`` rows, each branch's text over
  ``[text_b ; image]``, the image attention combined as in the double blocks, MLP and gates per token.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_chroma import ChromaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention

from .. import forward_patch
from ..family import Family, ForwardPatch
from ..guided import as_kwargs
from ..modulation import text_rows_forward
from ..pipeline import PromptAdapter
from ..registry import register_family
from ..split_attention import branch_join, combine, heads, image_attention
from .flux import NAGFluxAttnProcessor
from .flux_fast import qkv, rope, split_rope

PIPELINES = {"ChromaPipeline": {}, "ChromaImg2ImgPipeline": {}, "ChromaInpaintPipeline": {}}


def image_key_bias(key_mask: torch.Tensor, text_len: int) -> torch.Tensor:
    """The text part of the image queries' key mask ``[2B, T + N]`` as ``image_attention``'s ``text_mask``: bool
    masks as they are; float masks (SDPA adds them to the scores; Chroma's pipelines build 0/1 floats) relative to the
    image keys' value, which the image part of every Chroma mask holds for all image keys."""
    text = key_mask[:, :text_len]
    if not key_mask.is_floating_point():
        return text.to(torch.bool)
    return text - key_mask[:, text_len : text_len + 1]


def branch_attention(attend, can_split, q, k, v, tq, tk, tv, key_mask, nag):
    """Both branches' attention over ``[text_b ; image]`` with the image shared: ``(text [2B, T, C], image [B, N, C]
    combined)``. ``key_mask [2B, T + N]`` (or None) as Chroma's blocks use it: the mask of a (query, key) pair is
    ``mask[query] * mask[key]``."""
    batch, text_len = q.shape[0], tq.shape[1]
    text_pairs = None if key_mask is None else (key_mask[:, :text_len, None] * key_mask[:, None, :])[:, None]
    text = attend(tq, branch_join(tk, k), branch_join(tv, v), text_pairs)  # [2B, T, C]
    if can_split:
        bias = None if key_mask is None else image_key_bias(key_mask, text_len)
        return text, image_attention(q, k, v, tk, tv, nag, text_mask=bias)
    image_pairs = None if key_mask is None else (key_mask[:, text_len:, None] * key_mask[:, None, :])[:, None]
    image = attend(torch.cat([q, q]), branch_join(tk, k), branch_join(tv, v), image_pairs)  # [2B, N, C]
    return text, combine(image[:batch], image[batch:], nag)


class NAGChromaAttnProcessor(NAGFluxAttnProcessor):
    """FLUX.1's NAG processor with Chroma's attention masks in the double blocks; the single blocks run
    ``_single_forward``. Plain calls go to the wrapped stock ``FluxAttnProcessor``."""

    def can_split(self) -> bool:
        return self._parallel_config is None and self.backend_is_torch()

    def _double(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, nag):
        if attention_mask is None:
            return super()._double(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb, nag)
        # attention_mask [2B, 1, S, S] = mask[q] * mask[k]: an image query's row is the key mask.
        text_len = encoder_hidden_states.shape[1]
        key_mask = attention_mask[:, 0, text_len]  # [2B, T + N]
        projections = _get_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = heads(attn.head_dim, *projections[:3], attn.norm_q, attn.norm_k)
        tq, tk, tv = heads(attn.head_dim, *projections[3:], attn.norm_added_q, attn.norm_added_k)
        text_rope, image_rope = split_rope(image_rotary_emb, text_len)
        q, k, tq, tk = rope(q, image_rope), rope(k, image_rope), rope(tq, text_rope), rope(tk, text_rope)
        text = self.attend(tq, branch_join(tk, k), branch_join(tv, v), attention_mask[:, :, :text_len])
        if self.can_split():
            image = image_attention(q, k, v, tk, tv, nag, text_mask=image_key_bias(key_mask, text_len))
        else:
            batch = q.shape[0]
            image = self.attend(torch.cat([q, q]), branch_join(tk, k), branch_join(tv, v),
                                attention_mask[:, :, text_len:])
            image = combine(image[:batch], image[batch:], nag)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, attn.to_add_out(text)


def _get_projections(attn, hidden_states, encoder_hidden_states):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def _nag_record(kw):
    return (kw.get("joint_attention_kwargs") or {}).get("nag")


def _double_forward(self, *args, **kwargs):
    """``forward`` of the last double block: in a guided forward its text output ``[2B, T, C]`` is returned as
    ``[B, 2T, C]`` (positive text, then negative text, per latent row) for the single stack."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    text, image = forward_patch.call_previous(self, **kw)
    if _nag_record(kw) is not None and text.shape[0] == 2 * image.shape[0]:
        batch = image.shape[0]
        text = torch.cat([text[:batch], text[batch:]], dim=1)
    return text, image


def _single_forward(self, *args, **kwargs):
    """``forward`` of every single block. Guided: ``hidden_states [B, 2T + N, C]`` (positive text, negative text,
    image), ``temb [B, 3, C]``, ``attention_mask [2B, T + N]`` or None; returns the same layout."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    nag = _nag_record(kw)
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    processor = self.attn.processor  # NAG's: checked before the guided forward (Family.check_guided)
    h, temb, text_len = kw["hidden_states"], kw["temb"], nag.text_len
    batch = h.shape[0]
    text = torch.cat([h[:, :text_len], h[:, text_len : 2 * text_len]])  # [2B, T, C]
    image = h[:, 2 * text_len :]  # [B, N, C]
    image_n, image_gate = self.norm(image, emb=temb)
    text_n, text_gate = self.norm(text, emb=torch.cat([temb, temb]))
    attn = self.attn
    q, k, v = heads(attn.head_dim, *qkv(attn, image_n), attn.norm_q, attn.norm_k)
    tq, tk, tv = heads(attn.head_dim, *qkv(attn, text_n), attn.norm_q, attn.norm_k)
    text_rope, image_rope = split_rope(kw.get("image_rotary_emb"), text_len)
    q, k, tq, tk = rope(q, image_rope), rope(k, image_rope), rope(tq, text_rope), rope(tk, text_rope)
    text_attn, image_attn = branch_attention(processor.attend, processor.can_split(), q, k, v, tq, tk, tv,
                                             kw.get("attention_mask"), nag)

    def finish(x, x_norm, x_attn, gate):
        out = x + gate.unsqueeze(1) * self.proj_out(torch.cat([x_attn, self.act_mlp(self.proj_mlp(x_norm))], dim=2))
        return out.clip(-65504, 65504) if out.dtype == torch.float16 else out

    text = finish(text, text_n, text_attn, text_gate)
    return torch.cat([text[:batch], text[batch:], finish(image, image_n, image_attn, image_gate)], dim=1)


def _text_norms(model):
    return [(block.norm1_context, {"_nag_emb": "emb"}) for block in model.transformer_blocks]


def _last_double(model):
    return list(model.transformer_blocks)[-1:]


def _check(model, kw: dict, batch: int) -> None:
    if not len(model.transformer_blocks):
        raise ValueError("NAG on Chroma needs at least one double block")


def _rows_of_the_mask(original):
    """``_prepare_attention_mask`` for a NAG call: the positive mask has ``2B`` rows (the NAG negative's appended),
    so the image part gets as many rows as the text mask has, not the latent batch."""

    def prepare(batch_size, sequence_length, dtype, attention_mask=None):
        if attention_mask is not None:
            batch_size = attention_mask.shape[0]
        return original(batch_size, sequence_length, dtype, attention_mask)

    return prepare


CHROMA = Family(
    name="Chroma",
    models=(ChromaTransformer2DModel,),
    token_order="text_first",
    acts_in="the joint attention of the double- and single-stream blocks (image outputs), image stream shared",
    processors={FluxAttention: NAGChromaAttnProcessor},
    forward_patches=(
        ForwardPatch(text_rows_forward, _text_norms),
        ForwardPatch(_double_forward, _last_double),
        ForwardPatch(_single_forward, lambda model: model.single_transformer_blocks),
    ),
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_attention_mask": 2},
        per_branch=(0, 2),
        negative_kwargs=(("do_classifier_free_guidance", False),),
        call_patches=(("_prepare_attention_mask", _rows_of_the_mask),),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "fast"},
    per_branch=("attention_mask",),
    timestep_scale=1000.0,
    check=_check,
)
register_family(CHROMA)
