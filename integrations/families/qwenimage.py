"""NAG for ``QwenImageTransformer2DModel`` (Qwen-Image, its edit models and everything built on it):
docs/families/qwenimage.md.

Every block is a double-stream block over ``[text, image]`` with a text attention mask (``encoder_hidden_states_mask``)
and modulation from the timestep only. In a guided forward (``B`` image rows, ``2B`` text and mask rows, positive
then NAG-negative) the image stream keeps ``B`` rows throughout; edit pipelines' reference-image tokens are part of it.

- ``_text_modulate`` replaces each block's ``_modulate`` for the text stream: the ``B`` rows of modulation serve both
  branches' text rows (the modulation does not depend on the text).
- ``NAGQwenAttnProcessor`` wraps each stock ``QwenDoubleStreamAttnProcessor2_0``: image Q/K/V once; text queries of
  each branch over ``[text_b ; image]`` with the branch's key mask (the user's attention backend); image queries split
  into the image keys (once) and each branch's masked text keys, LSE-merged and NAG-combined before ``to_out``
  (``split_attention.image_attention(text_mask=...)``). Under context parallelism or a non-PyTorch attention backend
  it runs the unsplit per-branch attention through ``dispatch_attention_fn`` instead, then combines.

Plain forwards (no ``nag`` record) are the stock computation.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformer2DModel,
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
)

from ..family import Family, MethodPatch
from ..modular_spec import ModularSpec
from ..modulation import extend_rows
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, heads, image_attention

PIPELINES = {
    "QwenImagePipeline": {},
    "QwenImageImg2ImgPipeline": {},
    "QwenImageInpaintPipeline": {},
    "QwenImageEditPipeline": {},
    "QwenImageEditPlusPipeline": {},
}


def _rope(x, freqs):
    return x if freqs is None else apply_rotary_emb_qwen(x, freqs, use_real=False)


class NAGQwenAttnProcessor(NAGProcessor):
    """``QwenDoubleStreamAttnProcessor2_0`` with NAG: plain calls go to the wrapped stock processor, guided calls (a
    ``nag`` record) run NAG's joint attention. Same ``__call__`` signature plus ``nag``."""

    stock = QwenDoubleStreamAttnProcessor2_0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, nag=None):
        if nag is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                              image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("Qwen-Image takes no attention_mask; pass encoder_hidden_states_mask")
        # hidden_states [B, N, C] (image, once); encoder_hidden_states [2B, T, C]; mask [2B, T] or None.
        batch, mask = hidden_states.shape[0], encoder_hidden_states_mask
        head_dim = attn.inner_dim // attn.heads
        q, k, v = heads(head_dim, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                        attn.norm_q, attn.norm_k)
        c = encoder_hidden_states
        tq, tk, tv = heads(head_dim, attn.add_q_proj(c), attn.add_k_proj(c), attn.add_v_proj(c),
                           attn.norm_added_q, attn.norm_added_k)
        image_freqs, text_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        q, k = _rope(q, image_freqs), _rope(k, image_freqs)
        tq, tk = _rope(tq, text_freqs), _rope(tk, text_freqs)
        joint_mask = None
        if mask is not None:
            mask = mask.to(torch.bool)
            image_keys = mask.new_ones(mask.shape[0], k.shape[1])
            joint_mask = torch.cat([mask, image_keys], dim=1)[:, None, None, :]  # [2B, 1, 1, T + N]
        text_len = c.shape[1]
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if mask is not None and cp is not None and (cp.ring_degree or 1) > 1:
            raise NotImplementedError(
                "NAG on Qwen-Image under ring context parallelism (ring_degree > 1) with a text mask "
                "(encoder_hidden_states_mask) is not supported: diffusers' ring attention applies each rank's local "
                "key mask to every rank's keys. Use Ulysses (ulysses_degree), or call without a text mask"
            )
        if self._parallel_config is None and self.backend_is_torch():
            text = self.attend(tq, branch_join(tk, k), branch_join(tv, v), joint_mask)  # [2B, T, C]
            image = image_attention(q, k, v, tk, tv, nag, text_mask=mask)  # [B, N, C], merged and combined
        else:
            out = self.attend(branch_join(tq, q), branch_join(tk, k), branch_join(tv, v), joint_mask)
            text, image = out[:, :text_len], out[:, text_len:]
            image = combine(image[:batch], image[batch:], nag)
        image = attn.to_out[0](image.contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(text.contiguous())


# The stock method as a plain function: dynamo cannot trace ``QwenImageTransformerBlock._modulate`` looked up on the
# class inside a compiled block (regional compilation); a module-level function it inlines.
_stock_modulate = getattr(QwenImageTransformerBlock, "_modulate", None)


def _text_modulate(self, x, mod_params, index=None):
    """``_modulate`` of a block whose text stream has more rows than the modulation (a guided forward): the
    modulation, which depends on the timestep only, is extended to the text rows. Otherwise the stock method."""
    if index is None and mod_params.shape[0] < x.shape[0]:
        mod_params = extend_rows(mod_params, x.shape[0])
    return _stock_modulate(self, x, mod_params, index)


def _check(model, kw: dict, batch: int) -> None:
    # The model takes the image layout from img_shapes[0]; the stock pipelines give one entry per prompt, fewer than
    # the latent rows with num_images_per_prompt > 1, and NAG does not change the image stream. So: one entry per
    # sample, per prompt (a divisor of the batch) or 1; on a zero_cond_t model (a per-sample modulation index built
    # from img_shapes) one per sample or 1, as there the stock model takes no other length either.
    shapes = kw.get("img_shapes")
    if not isinstance(shapes, (list, tuple)):
        return
    n = len(shapes)
    if getattr(model.config, "zero_cond_t", False):
        if n not in (1, batch):
            raise ValueError(f"img_shapes must have one entry per latent sample ({batch}) or 1 on a zero_cond_t "
                             f"model, got {n}")
    elif n == 0 or batch % n:
        raise ValueError(f"img_shapes must have one entry per latent sample ({batch}), one per prompt (a divisor of "
                         f"{batch}) or 1, got {n}")


class QwenPromptAdapter(PromptAdapter):
    """Qwen-Image's pipelines encode each prompt at its own length, with a mask (``None`` when all tokens count):
    the positive and the NAG negative are padded to a common length (padding masked out) before they are joined."""

    def append(self, result, negative: dict):
        embeds, mask = result[0], result[1]
        n_embeds, n_mask = negative[0], negative[1]
        if n_embeds.shape[2:] != embeds.shape[2:]:
            raise ValueError(f"nag_negative_prompt_embeds must have width {embeds.shape[-1]} like the prompt's, got "
                             f"{tuple(n_embeds.shape)}")
        length = max(embeds.shape[1], n_embeds.shape[1])

        def padded(x, m):
            m = torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if m is None else m.to(x.device)
            if m.shape != x.shape[:2]:
                raise ValueError(f"nag_negative_prompt_embeds_mask must have shape {tuple(x.shape[:2])}, got "
                                 f"{tuple(m.shape)}")
            extra = length - x.shape[1]
            x = torch.nn.functional.pad(x, (0, 0, 0, extra))
            return x, torch.nn.functional.pad(m.to(torch.long), (0, extra))

        embeds, mask = padded(embeds, mask)
        n_embeds, n_mask = padded(n_embeds.to(device=embeds.device, dtype=embeds.dtype), n_mask)
        joined_mask = torch.cat([mask, n_mask.to(mask.device)])
        out = list(result)
        out[0], out[1] = torch.cat([embeds, n_embeds]), None if bool(joined_mask.all()) else joined_mask
        return type(result)(out) if isinstance(result, tuple) else out


QWENIMAGE = Family(
    name="Qwen-Image",


    modular=ModularSpec(


        model_names=("qwenimage", "qwenimage-edit", "qwenimage-edit-plus", "qwenimage-layered"),


        outputs={0: "prompt_embeds", 1: "prompt_embeds_mask"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"},


    ),
    models=(QwenImageTransformer2DModel,),
    token_order="text_first",
    acts_in="the joint attention of every double-stream block (image outputs, edit reference tokens included)",
    processors={Attention: NAGQwenAttnProcessor},
    method_patches=(MethodPatch("_modulate", _text_modulate, lambda model: model.transformer_blocks),),
    prompts=QwenPromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_embeds_mask": 1},
        optional=("nag_negative_prompt_embeds_mask",),  # None: every token counts, as encode_prompt returns it
        per_branch=(0, 1),
        forwarded=("device", "num_images_per_prompt", "max_sequence_length", "image"),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    per_branch=("encoder_hidden_states_mask",),
    timestep_scale=1000.0,
    attention_kwargs="attention_kwargs",
    modes=("exact",),
    check=_check,
)
register_family(QWENIMAGE)
