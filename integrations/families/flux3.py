"""NAG for ``Flux3Transformer2DModel`` (FLUX.3 and its step-distilled flow-map checkpoints): docs/families/flux3.md.

FLUX.3 runs each token mode through its own per-mode blocks first (``txt_mode_blocks`` over the text alone,
``mode_blocks["image"]`` over the image tokens, ``mode_blocks["image_cond"]`` over the reference tokens), then
single-stream blocks over ``[text, image, image_cond]``. Every token is modulated from the timestep only (the image
tokens at ``timestep``, the text and the reference tokens at 0, plus ``target_timestep`` on a flow map), never from
the text, so in the authors'-style 2B layout the two branches' image and reference tokens stay identical through
every block: the shared content stream computes exactly that result at the cost of duplicating the text alone. Both
mode names run it.

One guided forward (``B`` latent rows; ``encoder_hidden_states`` with ``2B`` rows = positive then NAG-negative, the
negative padded or cut to the prompt's window beforehand; ``guided.pre_hook`` checks the batches, runs ``_check``
and calls ``Flux3Family.deliver``):

- ``deliver`` packs the two branches' text along the sequence, ``[B, 2T, D]``, token by token interleaved (positive
  token 0, negative token 0, ...), and repeats each row of ``txt_ids`` for its negative twin (``[2T, 4]``), so the
  stock model forward runs unchanged at batch ``B``: its modulation has ``B`` rows, its per-token layers (embedders,
  norms, modulation, MLPs, gates) see ``2T`` text tokens, and it drops the text tokens before ``norm_out`` as usual.
  The record reaches the processors per thread (``call_state.record()``): the model does not pass its attention
  kwargs to the blocks.
- ``NAGFlux3AttnProcessor`` wraps ``Flux3AttnProcessor`` on every attention; in a guided forward it hands the call to
  the guided attention the family binds on that module (``GUIDED``, a ``MethodPatch``): ``_text_attention`` on the
  text mode blocks (each branch's text attends over its own tokens), ``_joint_attention`` on the single-stream blocks
  (text queries of branch ``b`` over ``[text_b ; image ; image_cond]`` through the user's attention backend; image
  and reference queries over the content keys once and over each branch's text keys, LSE-merged with the NAG combine
  fused in, ``split_attention.image_attention``). The image and reference mode blocks have none: their attention is
  the stock one, the content stream being shared. NAG acts on the content tokens' attention output where it enters
  ``to_out``. With a non-PyTorch attention backend, exact mode runs the unsplit per-branch attention through that
  backend instead (same numbers up to rounding).

diffusers 0.42.1 has no context-parallel plan (``_cp_plan``) for FLUX.3: a guided call under a parallel config is
refused. Plain forwards (no record) go to the wrapped stock processors. No ``forward`` is replaced.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux3 import (
    Flux3Attention,
    Flux3AttnProcessor,
    Flux3Transformer2DModel,
    _get_qkv_projections,
)

from .. import call_state, parallel
from ..family import Family, MethodPatch
from ..guided import NAGForward, rows
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine, image_attention

# FLUX.3 has no classic pipeline in diffusers 0.42.1; its modular blocks (Flux3AutoBlocks, Flux3DistilledAutoBlocks)
# are served by apply_nag(modular_pipeline) with the family's recommended settings. Nothing is published: this
# project's own starting point, as FLUX.2.
DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
GUIDED = "_nag_flux3_guided_attention"  # the guided attention bound on the text mode and single-stream blocks


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(parallel.refuse_without_plan, model=Flux3Transformer2DModel, family="FLUX.3")


def unpack(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2T, ...]`` (positive and NAG-negative tokens interleaved) -> ``[2B, T, ...]`` (positive rows first)."""
    return torch.cat([x[:, 0::2], x[:, 1::2]])


def pack(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``unpack``: ``[2B, T, ...]`` -> ``[B, 2T, ...]``, the branches' tokens interleaved."""
    return torch.stack([x[:batch], x[batch:]], dim=2).flatten(1, 2)


def fit_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """The NAG negative's text ``[R, T_neg, D]`` on the prompt's window of ``window`` tokens.

    FLUX.3's text-encoder step right-pads each prompt to a multiple of 80 tokens and the transformer attends to the
    padding, so a negative encoded on its own may have another window than the prompt. Longer: its first ``window``
    tokens (Qwen3-VL is causal: exactly the encoding of the negative truncated there). Shorter: its last row repeated
    to ``window`` tokens; when the negative's own window has padding (its tokens do not fill a multiple of 80
    exactly), that row is a padding token's output, and Qwen3-VL gives every padding token the same output (the same
    pad id at the same position id, attending to the same unmasked tokens), so this is exactly the negative encoded
    on the prompt's window.
    """
    length = x.shape[1]
    if length >= window:
        return x[:, :window]
    return torch.cat([x, x[:, -1:].expand(-1, window - length, *x.shape[2:])], dim=1)


def _qkv(attn: Flux3Attention, hidden_states: torch.Tensor, rotary):
    """The stock processor's queries, keys and values ``[B, S, H, D]``: QK norms and RoPE in float32, cast back."""
    query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in _get_qkv_projections(attn, hidden_states))
    query, key = attn.norm_q(query.float()), attn.norm_k(key.float())
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query.to(value.dtype), key.to(value.dtype), value


def _out(attn: Flux3Attention, x: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](x))


def _text_attention(attn, processor, hidden_states, rotary, nag: NAGForward) -> torch.Tensor:
    """A text mode block's attention on the packed text ``[B, 2T, C]``: each branch over its own ``T`` tokens."""
    q, k, v = _qkv(attn, hidden_states, rotary)
    out = processor.attend(unpack(q), unpack(k), unpack(v))  # [2B, T, C]
    return _out(attn, pack(out, nag.batch).to(q.dtype))


def _joint_attention(attn, processor, hidden_states, rotary, nag: NAGForward) -> torch.Tensor:
    """A single-stream block's attention on ``[packed text (2T) ; image ; image_cond]``: text queries per branch,
    content queries split and LSE-merged with the NAG combine fused (module docstring)."""
    q, k, v = _qkv(attn, hidden_states, rotary)
    batch, text_len, packed = nag.batch, nag.text_len, 2 * nag.text_len
    tq, tk, tv = (unpack(x[:, :packed]) for x in (q, k, v))  # [2B, T, H, D]
    q, k, v = (x[:, packed:] for x in (q, k, v))  # content (image, then reference tokens) [B, M, H, D]
    if nag.mode == "fast" or processor.backend_is_torch():
        text = processor.attend(tq, branch_join(tk, k), branch_join(tv, v))  # [2B, T, C]
        content = image_attention(q, k, v, tk, tv, nag)  # [B, M, C]
    else:  # the user's attention backend, each branch over its whole joint sequence
        out = processor.attend(branch_join(tq, q), branch_join(tk, k), branch_join(tv, v))  # [2B, T + M, C]
        text = out[:, :text_len]
        content = combine(out[:batch, text_len:].contiguous(), out[batch:, text_len:].contiguous(), nag)
    out = torch.cat([pack(text, batch), content.to(text.dtype)], dim=1)
    return _out(attn, out.to(q.dtype))


class NAGFlux3AttnProcessor(NAGProcessor):
    """``Flux3AttnProcessor`` with NAG (module docstring); plain calls, and the image and reference mode blocks'
    calls, go to the wrapped stock processor."""

    stock = Flux3AttnProcessor

    def __call__(
        self,
        attn: Flux3Attention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        nag: NAGForward | None = call_state.record()
        guided = getattr(attn, GUIDED, None)
        if nag is None or guided is None:  # a plain forward, or a mode block of the shared content stream
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("NAG on FLUX.3 takes no attention_mask (the stock model passes none); pass none")
        _refuse_parallel(self._parallel_config, "this call")
        return guided(self, hidden_states, image_rotary_emb, nag)


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch (also when NAG is off at this step)."""
    _refuse_parallel(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    text, width = kw["encoder_hidden_states"], model.config.joint_attention_dim
    if text.dim() != 3 or text.shape[-1] != width:
        raise ValueError(
            f"encoder_hidden_states must be [2B, T, joint_attention_dim={width}] in a NAG call, got {tuple(text.shape)}"
        )
    for name in ("timestep", "target_timestep"):
        n = rows(kw.get(name))
        if n not in (None, 1, batch):
            raise ValueError(
                f"{name} must have the batch of hidden_states ({batch}) or 1 in a NAG call, got {n}: only the text "
                "conditioning (encoder_hidden_states) has 2B rows"
            )
    n = rows(kw.get("image_cond_hidden_states"))
    if n not in (None, batch):
        raise ValueError(
            f"image_cond_hidden_states must have the batch of hidden_states ({batch}) in a NAG call, got {n}: the "
            "reference tokens are shared by both branches"
        )
    ids = kw.get("txt_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != text.shape[1]:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"txt_ids must have shape ({text.shape[1]}, {len(model.config.axes_dims_rope)}) (the prompt's text tokens, "
            f"position axes) in a NAG call, got {got}"
        )


class Flux3Prompts(PromptAdapter):
    """FLUX.3's text-encoder step sizes the window per prompt (a multiple of 80 tokens): the NAG negative's embeddings,
    encoded or given, are fitted to the prompt's window (``fit_window``) before they are appended."""

    def append(self, result, negative: dict):
        ref, x = result[0], negative[0]
        if isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor) and ref.dim() == 3:
            if x.dim() != 3 or x.shape[-1] != ref.shape[-1]:
                raise ValueError(
                    f"nag_negative_prompt_embeds must be [batch, tokens, {ref.shape[-1]}] (the prompt's stacked "
                    f"Qwen3-VL layers per token; any number of tokens: fitted to the prompt's window of "
                    f"{ref.shape[1]}), got {tuple(x.shape)}"
                )
            negative = {**negative, 0: fit_window(x, ref.shape[1])}
        return super().append(result, negative)


class Flux3Family(Family):
    """FLUX.3's family: the guided forward's text is packed along the sequence (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        kw[self.text] = pack(kw[self.text], record.batch)
        kw["txt_ids"] = kw["txt_ids"].repeat_interleave(2, dim=0)  # [2T, 4]: each negative token at its twin's place
        super().deliver(kw, extra, record)


def _text_attentions(model):
    return [block.attn for block in model.txt_mode_blocks]


def _joint_attentions(model):
    return [block.attn for block in model.single_transformer_blocks]


FLUX3 = Flux3Family(
    name="FLUX.3",


    modular=ModularSpec(  # Flux3AutoBlocks (CFG guider), Flux3DistilledAutoBlocks (no guider)


        outputs={0: "prompt_embeds"},


        guider_inputs={"prompt_embeds": "encoder_hidden_states"},


        model_names=("flux3", "flux3-distilled"),


    ),
    models=(Flux3Transformer2DModel,),
    token_order="text_first",
    acts_in="the attention of the single-stream blocks (the image and reference tokens' outputs, where they enter "
    "to_out), the image and reference streams shared by both branches (exact: the modulation does not depend on the "
    "text); the text mode blocks run per branch",
    processors={Flux3Attention: NAGFlux3AttnProcessor},
    guided_attention=lambda name, module: name.startswith(("txt_mode_blocks.", "single_transformer_blocks.")),
    method_patches=(MethodPatch(GUIDED, _text_attention, _text_attentions),
                    MethodPatch(GUIDED, _joint_attention, _joint_attentions)),
    prompts=Flux3Prompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device", "max_sequence_length", "text_encoder_out_layers"),
    ),
    pipelines={},
    defaults=DEFAULTS,
    timestep_scale=1000.0,  # the blocks pass t / 1000
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    check=_check,
)
register_family(FLUX3)
