"""NAG for ``Flux2Transformer2DModel`` (FLUX.2 [dev], FLUX.2 [klein]): docs/families/flux2.md.

FLUX.2 modulates every token from the timestep (and guidance) only, never from the text, so the image tokens of the
two branches of the authors'-style 2B layout stay identical through every block: the shared image stream computes
exactly that result at the cost of duplicating the text alone. Both mode names run it.

How one guided forward runs (``B`` latent rows, ``encoder_hidden_states`` ``[2B, T, D]`` = positive then
NAG-negative rows; ``guided.pre_hook`` checks the batches and calls ``Flux2Family.deliver``):

- ``deliver`` packs the two branches' text along the sequence, ``[B, 2T, D]``, token by token interleaved (positive
  token 0, negative token 0, positive token 1, ...), and gives each negative token its positive twin's text position
  (``txt_ids`` repeated per token), so the stock model forward runs unchanged at batch ``B``: its modulation has
  ``B`` rows, its per-token layers (embedders, norms, MLPs, gates) see ``2T + N`` tokens, and it drops the ``2T``
  text tokens before ``norm_out`` as usual.
- Under context parallelism (Ulysses, ring; docs/parallelism.md) diffusers' ``_cp_plan`` splits the packed text into
  equal contiguous slices, one per rank; interleaved, every rank holds the same positions of both branches (``T / P``
  tokens each, ``T`` a multiple of the degree ``P``), so each rank unpacks its own slice and the attention runs as
  one process's, over every rank's keys (the user's CP backend for the text queries, ``parallel.image_attention`` for
  the image queries). Under tensor parallelism the combine all-reduces its norms (``parallel.combine_sharded``).
- Only the attention differs. ``NAGFlux2AttnProcessor`` (double blocks) and ``NAGFlux2ParallelSelfAttnProcessor``
  (single blocks) unpack the text to ``[2B, T]``: text queries of branch ``b`` attend over ``[text_b ; image]``
  (``dispatch_attention_fn``, the user's backend), image queries over both branches' keys split and LSE-merged with
  the NAG combine fused in (``split_attention.image_attention``); the outputs are packed back for the stock
  projections. With a non-PyTorch attention backend, exact mode runs the unsplit per-branch attention through that
  backend instead (same numbers up to rounding).

Plain forwards (no ``nag`` record) go to the wrapped stock processors. No ``forward`` is replaced.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2AttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
    _get_qkv_projections,
)

from .. import parallel
from ..family import Family
from ..guided import NAGForward
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, heads

# Supported pipelines -> the recommended settings that differ from the family's there.
PIPELINES = {"Flux2Pipeline": {}, "Flux2KleinPipeline": {}, "Flux2KleinInpaintPipeline": {}}
KV_PROCESSORS = ("Flux2KVAttnProcessor", "Flux2KVParallelSelfAttnProcessor")


def unpack(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2T, ...]`` (positive and NAG-negative tokens interleaved) -> ``[2B, T, ...]`` (positive rows first)."""
    return torch.cat([x[:, 0::2], x[:, 1::2]])


def pack(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``unpack``: ``[2B, T, ...]`` -> ``[B, 2T, ...]``, the branches' tokens interleaved."""
    return torch.stack([x[:batch], x[batch:]], dim=2).flatten(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


class _Flux2Processor(NAGProcessor):
    """What both FLUX.2 processors share: the branch-split attention of a packed sequence."""

    def _check(self, attention_mask, nag: NAGForward) -> None:
        if attention_mask is not None:
            raise ValueError("NAG on FLUX.2 does not take an attention_mask in joint_attention_kwargs; pass none")
        self.local_text_len(nag)  # raises on a text length the context-parallel degree does not divide

    def local_text_len(self, nag: NAGForward) -> int:
        """Text tokens per branch on this rank: ``T``, or ``T / P`` under context parallelism of degree ``P``."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None:
            return nag.text_len
        degree = (cp.ring_degree or 1) * (cp.ulysses_degree or 1)
        if nag.text_len % degree:
            raise ValueError(
                f"NAG on FLUX.2 under context parallelism needs a text length divisible by the context-parallel "
                f"degree {degree} (each rank holds the same text positions of both branches), got {nag.text_len} "
                f"text tokens; pad the prompt to a multiple of {degree} (max_sequence_length)"
            )
        return nag.text_len // degree

    def joint(self, q, k, v, tq, tk, tv, rotary, nag: NAGForward, group=None):
        """Attention of one block for both branches.

        Args:
            q, k, v: image ``[B, N, H, D]`` (normed, before RoPE).
            tq, tk, tv: packed text ``[B, 2T, H, D]`` (normed, before RoPE; this rank's slice under CP).
            rotary: ``(cos, sin)``, each ``[2T + N, D]`` for the packed positions (each text position twice, then
                image).
            group: the tensor-parallel group of the attention's heads (``parallel.tp_group_of``), or ``None``.

        Returns:
            ``(text [B, 2T, H * D], image [B, N, H * D])``: each branch's text output, packed; the image output
            NAG-combined over the branches.
        """
        batch, text_len = q.shape[0], tq.shape[1] // 2
        tq, tk, tv = (unpack(t) for t in (tq, tk, tv))
        if rotary is not None:
            cos, sin = rotary
            tq, tk = (_rope(t, cos[: 2 * text_len : 2], sin[: 2 * text_len : 2]) for t in (tq, tk))
            q, k = (_rope(t, cos[2 * text_len:], sin[2 * text_len:]) for t in (q, k))
        if nag.mode == "fast" or self.backend_is_torch():
            text = self.attend(tq, branch_join(tk, k), branch_join(tv, v))  # [2B, T, C]
            image = parallel.image_attention(  # [B, N, C]; without parallelism split_attention.image_attention
                q, k, v, tk, tv, nag, parallel_config=self._parallel_config, group=group
            )
        else:  # the user's attention backend, each branch over its whole joint sequence
            out = self.attend(branch_join(tq, q), branch_join(tk, k), branch_join(tv, v))  # [2B, T + N, C]
            text = out[:, :text_len]
            z_pos, z_neg = out[:batch, text_len:].contiguous(), out[batch:, text_len:].contiguous()
            image = combine(z_pos, z_neg, nag) if group is None else parallel.combine(z_pos, z_neg, nag, group)
        return pack(text, batch), image


class NAGFlux2AttnProcessor(_Flux2Processor):
    """``Flux2AttnProcessor`` (double-stream blocks) with NAG; plain calls go to the wrapped stock processor."""

    stock = Flux2AttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        nag: NAGForward | None = None,
    ):
        if nag is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check(attention_mask, nag)
        # hidden_states [B, N, C] image; encoder_hidden_states [B, 2T, C] packed text.
        projections = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = heads(attn.head_dim, *projections[:3], attn.norm_q, attn.norm_k)
        tq, tk, tv = heads(attn.head_dim, *projections[3:], attn.norm_added_q, attn.norm_added_k)
        text, image = self.joint(q, k, v, tq, tk, tv, image_rotary_emb, nag, parallel.tp_group_of(attn))
        image = attn.to_out[1](attn.to_out[0](image.to(q.dtype)))
        return image, attn.to_add_out(text.to(q.dtype))


class NAGFlux2ParallelSelfAttnProcessor(_Flux2Processor):
    """``Flux2ParallelSelfAttnProcessor`` (single-stream blocks, attention fused with the MLP) with NAG."""

    stock = Flux2ParallelSelfAttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        nag: NAGForward | None = None,
    ):
        if nag is None:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        self._check(attention_mask, nag)
        # hidden_states [B, 2T + N, C]: packed text (positive, negative), then image.
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # as the stock processor (tensor parallelism)
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        q, k, v = heads(attn.head_dim, *qkv.chunk(3, dim=-1), attn.norm_q, attn.norm_k)
        split = 2 * self.local_text_len(nag)
        text, image = self.joint(
            q[:, split:], k[:, split:], v[:, split:], q[:, :split], k[:, :split], v[:, :split], image_rotary_emb, nag,
            parallel.tp_group_of(attn),
        )
        out = torch.cat([text, image], dim=1).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def _check(model, kw: dict, batch: int) -> None:
    if kw.get("kv_cache") is not None or kw.get("kv_cache_mode") is not None:
        raise NotImplementedError(
            "NAG does not support FLUX.2 [klein]'s KV-cached reference images (kv_cache / kv_cache_mode, "
            "Flux2KleinKVPipeline); use Flux2KleinPipeline with image=... (reference tokens recomputed each step)"
        )
    for name, module in model.named_modules():
        kind = type(getattr(module, "processor", None)).__name__
        if kind in KV_PROCESSORS:
            raise NotImplementedError(
                f"NAG cannot guide this call: {name} uses {kind} (set by Flux2KleinKVPipeline); NAG does not support "
                "FLUX.2 [klein]'s KV-cache processors. Use Flux2KleinPipeline, or set the stock processors "
                "(Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor) and call apply_nag again"
            )


class Flux2Prompts(PromptAdapter):
    """FLUX.2's pipelines encode like FLUX.1's (one text tensor; ``text_ids`` stays at the prompt's rows, the model
    uses its first row). ``Flux2Pipeline``'s caption upsampling rewrites the prompt before its one ``encode_prompt``
    call: that call is the positive one too."""

    def is_positive(self, call_args: dict, encode_args: dict) -> bool:
        if super().is_positive(call_args, encode_args):
            return True
        upsampled = bool(call_args.get("caption_upsample_temperature"))
        return upsampled and encode_args.get("prompt_embeds") is call_args.get("prompt_embeds")


class Flux2Family(Family):
    """FLUX.2's family: the guided forward's text is packed along the sequence (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        text, batch = kw[self.text], record.batch
        kw[self.text] = pack(text, batch)
        ids = kw.get("txt_ids")
        if ids is None:
            raise ValueError("txt_ids must be given in a NAG call (the text positions of the prompt's tokens)")
        # Each branch's text at the prompt's positions, interleaved as the text. [B, T, 4] stays 3-D (batch 1: the model
        # uses the first row's ids), so that diffusers' context-parallel plan splits it along with the text.
        ids = ids[:1] if ids.dim() == 3 else ids
        kw["txt_ids"] = ids.repeat_interleave(2, dim=-2)
        super().deliver(kw, extra, record)


FLUX2 = Flux2Family(
    name="FLUX.2",


    modular=ModularSpec(


        model_names=("flux2", "flux2-klein"),


        outputs={0: "prompt_embeds"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states"},


    ),
    models=(Flux2Transformer2DModel,),
    token_order="text_first",
    acts_in="the joint attention of the double-stream and the fused single-stream blocks (image outputs), the "
    "image stream shared by both branches (exact: the modulation does not depend on the text)",
    processors={Flux2Attention: NAGFlux2AttnProcessor,
                Flux2ParallelSelfAttention: NAGFlux2ParallelSelfAttnProcessor},
    prompts=Flux2Prompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device", "num_images_per_prompt", "max_sequence_length", "text_encoder_out_layers"),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    timestep_scale=1000.0,
    check=_check,
)
register_family(FLUX2)
