"""NAG for ``SD3Transformer2DModel`` (Stable Diffusion 3 and 3.5): docs/families/sd3.md.

The joint sequence is ``[image, text]`` (no RoPE). In a guided forward the image stream keeps its ``L`` latent rows
in every block and the text stream has ``L + g`` rows: one per latent row, then the NAG-negative rows of the last
``g`` latent rows (``g = L``: the plain guided call; ``g < L``: the pipeline batched CFG's unconditional and
conditional rows, only the conditional ones guided, ``guided.NAGForward.guided``).

- ``SD3Family.deliver`` keeps the first ``L`` rows of ``pooled_projections``: the authors encode the NAG negative's
  pooled vector and do not use it, so ``temb`` has one row per latent row.
- ``modulation.text_rows_forward`` replaces the ``forward`` of each block's ``norm1_context``: text rows past ``temb``'s get
  the conditioning of the latent row they belong to (the NAG-negative rows: the positive ones).
- ``NAGJointAttnProcessor`` wraps each stock ``JointAttnProcessor2_0``. Guided rows: image Q/K/V once; text queries
  of each branch over ``[image ; text_b]``; image queries split into the image keys (once) and each branch's text
  keys, LSE-merged and NAG-combined (``split_attention.image_attention``) before ``to_out``; unguided rows (batched
  CFG's unconditional ones): the stock joint attention. SD3.5's image self-attention ``attn2`` runs plain.

Plain forwards (no ``nag`` record) are the stock computation. The transformer's own processor setters keep NAG's
processors (``processor_setters``): after ``fuse_qkv_projections`` they wrap ``FusedJointAttnProcessor2_0`` (plain
calls run it) and a guided call projects through the fused ``to_qkv`` / ``to_added_qkv``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..family import Family, ForwardPatch
from ..guided import rows
from ..modular_spec import ModularSpec
from ..modulation import text_rows_forward
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..processor_setters import setter_patches
from ..registry import register_family
from ..split_attention import branch_join, heads, image_attention

PIPELINES = {
    "StableDiffusion3Pipeline": {},
    "StableDiffusion3Img2ImgPipeline": {},
    "StableDiffusion3InpaintPipeline": {},
}


def joint_attention(attend, q, k, v, tq, tk, tv):
    """The stock joint attention of ``[image ; text]`` (rows of one branch each): ``(image [R, N, C], text
    [R, T, C])``."""
    n = q.shape[1]
    out = attend(torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1))
    return out[:, :n], out[:, n:]


class NAGJointAttnProcessor(NAGProcessor):
    """``JointAttnProcessor2_0`` with NAG: plain calls (and SD3.5's ``attn2``, which has no text) go to the wrapped
    stock processor; guided calls (a ``nag`` record) run NAG's joint attention."""

    stock = JointAttnProcessor2_0
    wraps = (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)  # the latter: fuse_qkv_projections

    @classmethod
    def can_wrap(cls, processor) -> bool:
        return any(isinstance(processor, stock) and type(processor).__call__ is stock.__call__ for stock in cls.wraps)

    @property
    def _attention_backend(self):  # the stock SD3 processor has none (it calls SDPA itself)
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, nag=None, **kw):
        if nag is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kw)
        if attention_mask is not None:
            raise ValueError("NAG on SD3 takes no attention_mask (the stock SD3 attention has none)")
        return self._guided(attn, hidden_states, encoder_hidden_states, nag)

    def _projections(self, attn, hidden_states, encoder_hidden_states, text: bool):
        """Q, K, V of the image (``text=False``) or the text: through the fused ``to_qkv`` / ``to_added_qkv`` when the
        wrapped processor is the fused one (``fuse_qkv_projections``), else through the separate projections."""
        fused = getattr(attn, "to_added_qkv" if text else "to_qkv", None)
        if isinstance(self.inner, FusedJointAttnProcessor2_0) and isinstance(fused, torch.nn.Module):
            qkv = fused(encoder_hidden_states if text else hidden_states)
            return qkv.split(qkv.shape[-1] // 3, dim=-1)
        if text:
            c = encoder_hidden_states
            return attn.add_q_proj(c), attn.add_k_proj(c), attn.add_v_proj(c)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def _guided(self, attn, hidden_states, encoder_hidden_states, nag):
        # hidden_states [L, N, C]; encoder_hidden_states [L + g, T, C]: one row per latent row, then the g NAG rows.
        latent_rows, guided = hidden_states.shape[0], nag.guided_rows
        plain = latent_rows - guided  # batched CFG's unconditional rows (0 in a plain guided call)
        if encoder_hidden_states.shape[0] != latent_rows + guided:
            raise ValueError(
                f"encoder_hidden_states must have {latent_rows + guided} rows for {latent_rows} image rows, "
                f"{guided} of them guided; got {encoder_hidden_states.shape[0]}"
            )
        head_dim = attn.inner_dim // attn.heads
        q, k, v = heads(head_dim, *self._projections(attn, hidden_states, encoder_hidden_states, False), attn.norm_q,
                        attn.norm_k)
        tq, tk, tv = heads(head_dim, *self._projections(attn, hidden_states, encoder_hidden_states, True),
                           attn.norm_added_q, attn.norm_added_k)
        g = slice(plain, None)
        # Guided rows: text queries of each branch over [image ; text_b], the image K/V shared by both branches.
        text = self.attend(tq[g], branch_join(tk[g], k[g], text_first=False), branch_join(tv[g], v[g], text_first=False))
        image = image_attention(q[g], k[g], v[g], tk[g], tv[g], nag)  # [g, N, C], merged and combined
        if plain:
            p = slice(0, plain)
            image_p, text_p = joint_attention(self.attend, q[p], k[p], v[p], tq[p], tk[p], tv[p])
            image, text = torch.cat([image_p, image]), torch.cat([text_p, text])
        image = attn.to_out[1](attn.to_out[0](image))
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def _text_norms(model):
    for block in model.transformer_blocks:
        yield block.norm1_context, {"_nag_emb": "conditioning_embedding" if block.context_pre_only else "emb"}


def _check(model, kw: dict, batch: int) -> None:
    if kw.get("pooled_projections") is None:
        raise ValueError(f"pooled_projections must have batch {2 * batch} like encoder_hidden_states, got None")


class SD3Family(Family):
    """SD3's family: the guided forward's ``temb`` has one row per latent row (the NAG-negative pooled rows are
    dropped, as in the authors' pipeline)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        pooled = kw.get("pooled_projections")
        if rows(pooled) is not None and rows(pooled) > record.batch:
            kw["pooled_projections"] = pooled[: record.batch]
        super().deliver(kw, extra, record)


SD3 = SD3Family(
    name="SD3",


    modular=ModularSpec(


        model_names=("stable-diffusion-3",),


        outputs={0: "prompt_embeds", 2: "pooled_prompt_embeds"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "text_embeds"},


    ),
    models=(SD3Transformer2DModel,),
    token_order="image_first",
    acts_in="the joint attention of every block (image outputs); SD3.5's image self-attention attn2 unguided",
    processors={Attention: NAGJointAttnProcessor},
    forward_patches=(ForwardPatch(text_rows_forward, _text_norms),),
    method_patches=setter_patches(SD3Transformer2DModel),
    guided_attention=lambda name, module: module.add_k_proj is not None,  # joint attention; SD3.5's attn2 unguided
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt", "nag_negative_prompt_2": "prompt_2",
                 "nag_negative_prompt_3": "prompt_3"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_pooled_prompt_embeds": 2},
        per_branch=(0, 2),
        forwarded=("device", "num_images_per_prompt", "max_sequence_length", "lora_scale", "clip_skip"),
        negative_kwargs=(("do_classifier_free_guidance", False),),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.125, "end": 1.0, "mode": "exact"},
    per_branch=("pooled_projections",),
    modes=("exact",),
    batched_cfg=True,
    check=_check,
)
register_family(SD3)
