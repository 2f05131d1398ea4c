"""NAG for ``Krea2Transformer2DModel`` (Krea 2 and its distilled turbo checkpoint): docs/families/krea2.md.

Krea 2 fuses a stack of text-encoder layers per token (``encoder_hidden_states [B, T, layers, dim]``) with a text-only
fusion transformer (layerwise blocks across the layer axis, then refiner blocks across the tokens, with the text
mask), projects it (``txt_in``) and runs single-stream blocks over ``[text, image]`` with grouped-query attention
(GQA), RoPE and a sigmoid output gate. Every token is modulated from the timestep only, never from the text, so in the
authors'-style 2B layout the two branches' image tokens stay identical through every block: the shared image stream
computes exactly that result at the cost of duplicating the text alone. Both mode names run it.

One guided forward (``B`` latent rows; ``encoder_hidden_states`` and ``encoder_attention_mask`` with ``2B`` rows =
positive then NAG-negative; ``guided.pre_hook`` checks the batches, runs ``_check`` and calls ``Krea2Family.deliver``):

- ``deliver`` packs the two branches' text along the sequence, ``[B, 2T, layers, dim]`` and mask ``[B, 2T]``, token
  by token interleaved (positive token 0, negative token 0, ...), and repeats each text row of ``position_ids`` for
  its negative twin (``[2T + N, 3]``), so the stock model forward runs unchanged at batch ``B``: its modulation has
  ``B`` rows, its per-token layers see ``2T + N`` tokens, and it drops the ``2T`` text tokens at the output as usual.
  The record reaches the processors per thread (``call_state.record()``): the model does not pass its attention
  kwargs to the blocks.
- ``_fusion_forward`` (the text fusion's ``forward``): unpacks the text to ``[2B, T]``, runs the stock text fusion
  on it (each branch's refiner attention over its own tokens with its own mask) and packs the result back.
- ``NAGKrea2AttnProcessor`` (wrapping ``Krea2AttnProcessor``) in the main blocks (the only calls with RoPE; the text
  fusion's attention passes none and goes to the stock processor): the stock projections, QK norms and RoPE on the
  packed sequence, K/V heads repeated to the query heads (GQA, as the stock processor does), then text queries of
  branch ``b`` attend over ``[text_b ; image]`` with that branch's mask (``dispatch_attention_fn``: the user's
  backend), image queries over the image keys once and over each branch's text keys, LSE-merged with the NAG combine
  fused in (``split_attention.image_attention``). NAG acts on the attention output where it enters ``to_out``: after
  the sigmoid output gate. The gate is the image token's own (one for both branches) and the merge is linear in the
  partial outputs per query and head, so the partial outputs are gated before ``nag_merge``: it then merges and
  combines exactly the gated outputs. With a non-PyTorch attention backend, exact mode runs the unsplit per-branch
  attention through that backend instead (same numbers up to rounding).

diffusers 0.42.1 has no context-parallel plan (``_cp_plan``) for Krea 2: a guided call under a parallel config is
refused. Plain forwards (no record) go to the wrapped stock processors and the stock text fusion.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_krea2 import (
    Krea2Attention,
    Krea2AttnProcessor,
    Krea2Transformer2DModel,
)

from .. import call_state, forward_patch, parallel
from ..family import Family, ForwardPatch
from ..guided import NAGForward, as_kwargs, rows
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, image_attention, merge_combine

# Supported pipelines -> the recommended settings that differ from the family's there (the turbo checkpoint runs in
# the same pipeline class, is_distilled=True). Nothing is published: this project's own starting point.
PIPELINES = {"Krea2Pipeline": {}}
DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(parallel.refuse_without_plan, model=Krea2Transformer2DModel, family="Krea 2")


def unpack(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``[B, 2T, ...]`` along ``dim`` (positive and NAG-negative tokens interleaved) -> ``[2B, T, ...]`` (positive
    rows first)."""
    index = [slice(None)] * x.dim()
    parts = []
    for start in (0, 1):
        index[dim] = slice(start, None, 2)
        parts.append(x[tuple(index)])
    return torch.cat(parts)


def pack(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``unpack`` along dim 1: ``[2B, T, ...]`` -> ``[B, 2T, ...]``, the branches' tokens interleaved."""
    return torch.stack([x[:batch], x[batch:]], dim=2).flatten(1, 2)


def _gated_merge(gate: torch.Tensor):
    """``split_attention.merge_combine`` of the partial outputs times the output gate ``[B, N, H, D]``: the LSE merge
    is linear in the partial outputs (per query and head), so this is the combine of the gated branch outputs."""

    def merge(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, nag):
        return merge_combine(o_shared * gate, lse_shared, o_pos * gate, lse_pos, o_neg * gate, lse_neg, nag)

    return merge


class NAGKrea2AttnProcessor(NAGProcessor):
    """``Krea2AttnProcessor`` with NAG (module docstring); plain calls and the text fusion's calls go to the wrapped
    stock processor."""

    stock = Krea2AttnProcessor

    def __call__(
        self,
        attn: Krea2Attention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        nag: NAGForward | None = call_state.record()
        if nag is None or image_rotary_emb is None:  # a plain forward, or a text-fusion block (no RoPE there)
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        _refuse_parallel(self._parallel_config, "this call")
        # hidden_states [B, 2T + N, C]: packed text (positive, negative interleaved), then image.
        batch, text_len, packed = nag.batch, nag.text_len, 2 * nag.text_len
        heads, head_dim = attn.num_heads, attn.head_dim
        query = attn.to_q(hidden_states).unflatten(-1, (heads, head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, head_dim))
        gate = torch.sigmoid(attn.to_gate(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        # Each packed token carries its own position (deliver repeats the text rows of position_ids).
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        groups = heads // attn.num_kv_heads
        if groups > 1:  # GQA: repeat the K/V heads, as the stock processor does
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        tq, tk, tv = (unpack(x[:, :packed]) for x in (query, key, value))  # [2B, T, H, D]
        q, k, v = (x[:, packed:] for x in (query, key, value))  # [B, N, H, D]
        text_gate, image_gate = unpack(gate[:, :packed]), gate[:, packed:]
        text_mask = branch_mask = None
        if attention_mask is not None:  # the model's key mask [B, 1, 1, 2T + N]: the text part per branch
            text_mask = unpack(attention_mask.reshape(batch, -1)[:, :packed])  # [2B, T]
            image_keys = text_mask.new_ones((2 * batch, q.shape[1]))
            branch_mask = torch.cat([text_mask, image_keys], dim=1)[:, None, None, :]  # [2B, 1, 1, T + N]
        if nag.mode == "fast" or self.backend_is_torch():
            text = self.attend(tq, branch_join(tk, k), branch_join(tv, v), branch_mask)  # [2B, T, C]
            gate_heads = image_gate.unflatten(-1, (heads, head_dim))
            image = image_attention(q, k, v, tk, tv, nag, text_mask, merge=_gated_merge(gate_heads))  # [B, N, C]
        else:  # the user's attention backend, each branch over its whole joint sequence
            out = self.attend(branch_join(tq, q), branch_join(tk, k), branch_join(tv, v), branch_mask)
            text = out[:, :text_len]
            image = out[:, text_len:]
            image = combine((image[:batch] * image_gate).contiguous(), (image[batch:] * image_gate).contiguous(), nag)
        text = text * text_gate
        out = torch.cat([pack(text, batch), image.to(text.dtype)], dim=1)
        return attn.to_out[0](out)


def _fusion_forward(self, *args, **kwargs):
    """``forward`` of the text fusion (``Krea2TextFusion``): in a guided forward its text arrives packed
    ``[B, 2T, layers, dim]`` (mask ``[B, 1, 1, 2T]``); the stock fusion runs on the unpacked ``[2B, T]`` rows (each
    branch's refiner attention over its own tokens) and its output is packed again. Otherwise the stock forward."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    nag = call_state.record()
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    kw["encoder_hidden_states"] = unpack(kw["encoder_hidden_states"])
    if kw.get("attention_mask") is not None:
        kw["attention_mask"] = unpack(kw["attention_mask"], dim=-1)
    return pack(forward_patch.call_previous(self, **kw), nag.batch)


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch (also when NAG is off at this step)."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    if torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
        # The blocks' recomputation in backward runs after the forward, without the forward's record.
        raise NotImplementedError(
            "NAG on Krea 2 does not support gradient checkpointing (the blocks are recomputed in backward, after the "
            "guided forward): call model.disable_gradient_checkpointing(), or run the guided forward under "
            "torch.no_grad()"
        )
    text, config = kw["encoder_hidden_states"], model.config
    shape = (config.num_text_layers, config.text_hidden_dim)
    if text.dim() != 4 or tuple(text.shape[2:]) != shape:
        raise ValueError(
            f"encoder_hidden_states must be [2B, T, num_text_layers={shape[0]}, text_hidden_dim={shape[1]}] in a NAG "
            f"call, got {tuple(text.shape)}"
        )
    text_len = text.shape[1]
    mask = kw.get("encoder_attention_mask")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"encoder_attention_mask must be a bool mask (True = a valid text token), got {mask.dtype}")
        if tuple(mask.shape) != (2 * batch, text_len):
            raise ValueError(
                f"encoder_attention_mask must have shape {(2 * batch, text_len)} (the rows and tokens of "
                f"encoder_hidden_states) in a NAG call, got {tuple(mask.shape)}"
            )
    n = rows(kw.get("timestep"))
    if n not in (None, batch):
        raise ValueError(
            f"timestep must have the batch of hidden_states ({batch}) in a NAG call, got {n}: only the text "
            "conditioning (encoder_hidden_states, encoder_attention_mask) has 2B rows"
        )
    ids, image_len = kw.get("position_ids"), kw["hidden_states"].shape[1]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or tuple(ids.shape) != (text_len + image_len, 3):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"position_ids must have shape {(text_len + image_len, 3)} (text tokens + image tokens, 3) in a NAG "
            f"call, got {got}"
        )


class Krea2Family(Family):
    """Krea 2's family: the guided forward's text is packed along the sequence (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        batch, text_len = record.batch, record.text_len
        kw[self.text] = pack(kw[self.text], batch)
        if kw.get("encoder_attention_mask") is not None:
            kw["encoder_attention_mask"] = pack(kw["encoder_attention_mask"], batch)
        ids = kw["position_ids"]  # [T + N, 3]: each text row twice (the negative token at its twin's position)
        kw["position_ids"] = torch.cat([ids[:text_len].repeat_interleave(2, dim=0), ids[text_len:]])
        super().deliver(kw, extra, record)


KREA2 = Krea2Family(
    name="Krea2",


    modular=ModularSpec(


        model_names=("krea2",),


        outputs={0: "prompt_embeds", 1: "prompt_embeds_mask"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_attention_mask"},


        pipelines={"Krea2AutoBlocks": "Krea2Pipeline", "Krea2TurboAutoBlocks": "Krea2Pipeline"},


    ),
    models=(Krea2Transformer2DModel,),
    token_order="text_first",
    acts_in="the attention of the single-stream blocks (image outputs after the sigmoid output gate, where they "
    "enter to_out), the image stream shared by both branches (exact: the modulation does not depend on the text); "
    "the text fusion runs per branch",
    processors={Krea2Attention: NAGKrea2AttnProcessor},
    guided_attention=lambda name, module: name.startswith("transformer_blocks."),
    forward_patches=(ForwardPatch(_fusion_forward, lambda model: [model.text_fusion]),),
    prompts=PromptAdapter(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0, "nag_negative_prompt_embeds_mask": 1},
        per_branch=(0, 1),
        forwarded=("device", "num_images_per_prompt", "max_sequence_length"),
    ),
    pipelines=PIPELINES,
    defaults=DEFAULTS,
    per_branch=("encoder_attention_mask",),
    timestep_scale=1000.0,  # the pipelines pass t / 1000
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    check=_check,
)
register_family(KREA2)
