"""NAG for ``MiniMaxH3Transformer3DModel`` (MiniMax-H3, joint video + audio; modular blocks ``MiniMaxH3Blocks``):
docs/families/minimax_h3.md.

MiniMax-H3 is guidance-distilled (one forward per step, no negative prompt): NAG is its only guidance. The model runs
one stack of blocks over **one packed sequence** whose index tensors (``text_indices``, ``video_indices``,
``audio_indices``) place the text, conditioning, audio and target rows, and modulates every row from its timestep and
modality tag only (``adaln_indices = timestep_indices * 3 + token_tags``), never from the text. So the media rows of
the two branches of a 2B layout get the same modulation; the shared media stream (media rows once, the NAG
negative's text as an extra segment of the packed sequence) is the family's guided layout.

How one guided forward runs (``B`` latent rows, ``encoder_hidden_states`` ``[2B, T, D]`` = positive then NAG-negative
rows; ``guided.pre_hook`` checks the batches and calls ``MiniMaxH3Family.deliver``):

- ``deliver`` packs the text along the sequence, ``[B, 2T, D]`` (positive tokens, then negative tokens), adds the
  negative's ``T`` rows to the packed sequence, each with its positive twin's position, modality tag and timestep
  index, and lays the ``S + T`` rows out as ``P`` equal chunks of ``[positive text, negative text, media]`` (``P``
  the context-parallel degree, 1 without parallelism): ``position_ids``, ``token_tags``, ``timestep_indices`` are
  permuted, ``text_indices`` / ``video_indices`` / ``audio_indices`` mapped to the new rows. The stock model forward
  then runs unchanged at batch ``B``: its per-row layers see ``S + T`` rows and its output heads select the video
  and audio rows as usual. (``_check`` hands ``P`` to ``deliver`` per thread, ``call_state``.)
- Only the attention differs (``NAGMiniMaxH3AttnProcessor``, the record per thread: the model passes no attention
  kwargs to its processors). The token refiner's attention (no rotary embedding) runs per branch (``[2B, T]``, the
  stock processor). In the blocks (a chunk: ``t = T / P`` rows of each text, ``m = M / P`` media rows): the positive
  text queries attend to ``[text_pos ; media]`` (stock), the negative's text queries to ``[text_neg ; media]``, both
  through the user's attention backend; the media queries (every row that is not text: conditioning, reference audio,
  target video and audio) over both branches' keys, split into the shared media keys (once) and each branch's text
  keys, LSE-merged with the NAG combine fused (``parallel.image_attention``: ``split_attention.image_attention``
  without parallelism). With a non-PyTorch attention backend, exact mode runs the unsplit per-branch attention of the
  media queries through that backend (same numbers up to rounding).
- Context parallelism (Ulysses, ring): diffusers' ``_cp_plan`` splits the packed sequence into one contiguous chunk
  per rank at the first block, so every rank holds ``t`` tokens of each text and ``m`` media rows, and the attention
  above runs over every rank's keys through diffusers' CP templates. ``T`` and ``M`` must be divisible by ``P``
  (refused by name otherwise); tensor parallelism is refused.

Plain forwards (no record) go to the wrapped stock processors. No ``forward`` is replaced.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.transformers.transformer_minimax_h3 import (
    MiniMaxH3Attention,
    MiniMaxH3AttnProcessor,
    MiniMaxH3Transformer3DModel,
    _apply_rotary_emb,
)

from .. import call_state, parallel
from ..family import Family
from ..guided import NAGForward, carry_record_into_checkpoints, rows, uncarry
from ..modular_spec import ModularSpec
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import branch_join, combine

DEFAULTS = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"}
DEGREE = "minimax_h3_degree"  # call_state slot: the guided call's context-parallel degree (_check -> deliver)
LAYOUT = ("position_ids", "token_tags", "timestep_indices", "video_indices", "audio_indices", "text_indices")


@dataclasses.dataclass(frozen=True)
class MiniMaxH3Forward(NAGForward):
    """The guided forward's record with the context-parallel degree ``degree`` of its packed layout (``deliver``:
    ``degree`` chunks of ``[positive text, NAG-negative text, media]``, 1 without context parallelism)."""

    degree: int = 1

    @property
    def local_text_len(self) -> int:
        """Text tokens per branch in this rank's chunk of the packed sequence."""
        return self.text_len // self.degree


def unpack(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2T, ...]`` (positive tokens, then negative tokens) -> ``[2B, T, ...]`` (positive rows first)."""
    return torch.cat(x.chunk(2, dim=1))


def pack(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``unpack``: ``[2B, T, ...]`` -> ``[B, 2T, ...]``."""
    return torch.cat([x[:batch], x[batch:]], dim=1)


def fit_text(x: torch.Tensor, length: int) -> torch.Tensor:
    """The NAG negative's text ``[R, T_neg, D]`` on the prompt's ``length`` tokens: its first ``length`` tokens when
    longer (Qwen3-VL is causal: exactly the encoding of the negative cut there), its last row repeated when shorter
    (the family's definition; the packed sequence has no padding and no mask)."""
    have = x.shape[1]
    if have >= length:
        return x[:, :length]
    return torch.cat([x, x[:, -1:].expand(-1, length - have, *x.shape[2:])], dim=1)


def degree_of(config, where: str) -> int:
    """The context-parallel degree of a parallel config (1 for none); tensor parallelism is refused."""
    if config is None:
        return 1
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise NotImplementedError(
            f"NAG cannot guide {where} under tensor parallelism: NAG's MiniMax-H3 integration supports context "
            "parallelism (the model's _cp_plan) only. Call without NAG arguments, or run NAG without the "
            "tensor_parallel_config"
        )
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return 1
    return (cp.ring_degree or 1) * (cp.ulysses_degree or 1)


class NAGMiniMaxH3AttnProcessor(NAGProcessor):
    """``MiniMaxH3AttnProcessor`` with NAG (module docstring); plain calls go to the wrapped stock processor."""

    stock = MiniMaxH3AttnProcessor

    def __call__(
        self,
        attn: MiniMaxH3Attention,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        nag = call_state.record()
        if not isinstance(nag, MiniMaxH3Forward):
            return self.inner(attn, hidden_states, rotary_emb, attention_mask)
        if degree_of(self._parallel_config, "this call") != nag.degree:
            raise RuntimeError(
                f"NAG cannot guide this call: an attention processor runs under a context-parallel degree of "
                f"{degree_of(self._parallel_config, 'this call')} but the model's parallel config has "
                f"{nag.degree}; set parallelism with model.enable_parallelism (both, or neither)"
            )
        if attention_mask is not None:
            raise ValueError("NAG on MiniMax-H3 does not take an attention_mask (the stock model passes none)")
        if rotary_emb is None:  # the token refiner: [B, 2T, C] packed text, each branch on its own
            return pack(self.inner(attn, unpack(hidden_states), None, None), nag.batch)
        return self._blocks(attn, hidden_states, rotary_emb, nag)

    def _blocks(self, attn, hidden_states, rotary_emb, nag: MiniMaxH3Forward) -> torch.Tensor:
        # hidden_states [B, 2t + m, C]: this rank's chunk of the packed sequence (deliver): t positive text rows, the
        # NAG negative's t text rows, m media rows (the whole sequence without context parallelism).
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = _apply_rotary_emb(query, *rotary_emb), _apply_rotary_emb(key, *rotary_emb)

        batch, split = nag.batch, 2 * nag.local_text_len
        tq, tk, tv = (unpack(t[:, :split]) for t in (query, key, value))  # [2B, t, H, D]: positive, then negative
        mq, mk, mv = (t[:, split:] for t in (query, key, value))  # [B, m, H, D]
        text = self.attend(tq, branch_join(tk, mk), branch_join(tv, mv))  # [2B, t, H * D]
        if nag.mode == "fast" or self.backend_is_torch():
            # [B, m, H * D]; without parallelism split_attention.image_attention
            media = parallel.image_attention(mq, mk, mv, tk, tv, nag, parallel_config=self._parallel_config)
        else:  # the user's attention backend, each branch over its whole sequence
            out = self.attend(branch_join(tq, mq), branch_join(tk, mk), branch_join(tv, mv))  # [2B, t + m, H * D]
            media = combine(out[:batch, split // 2:].contiguous(), out[batch:, split // 2:].contiguous(), nag)
        out = torch.cat([pack(text.to(query.dtype), batch), media.to(query.dtype)], dim=1)
        return attn.to_out[1](attn.to_out[0](out))


def _check(model, kw: dict, batch: int) -> None:
    """A guided forward's inputs that the batch rule alone does not catch (also when NAG is off at this step)."""
    degree = degree_of(getattr(model, "_parallel_config", None), f"this {type(model).__name__}")
    refiner = model.token_refiner
    if getattr(refiner, "gradient_checkpointing", False):  # its own checkpointing: the record into its recomputation
        carry_record_into_checkpoints(refiner)
    missing = [name for name in LAYOUT if not isinstance(kw.get(name), torch.Tensor)]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be given as tensors in a NAG call (the packed layout)")
    text = kw["encoder_hidden_states"]
    if text.dim() != 3 or text.shape[-1] != model.config.text_dim:
        raise ValueError(
            f"encoder_hidden_states must be [2B, T, text_dim={model.config.text_dim}] in a NAG call, got "
            f"{tuple(text.shape)}"
        )
    n = rows(kw.get("audio_hidden_states"))
    if n != batch:
        raise ValueError(
            f"audio_hidden_states must have the batch of hidden_states ({batch}) in a NAG call, got {n}: only "
            "encoder_hidden_states has 2B rows"
        )
    positions = kw["position_ids"]
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(f"position_ids must be a (seq_len, 3) tensor, got {tuple(positions.shape)}")
    length = positions.shape[0]
    for name in ("token_tags", "timestep_indices"):
        if tuple(kw[name].shape) != (length,):
            raise ValueError(f"{name} must have shape ({length},) like position_ids in a NAG call, got "
                             f"{tuple(kw[name].shape)}")
    counts = {name: kw[name].numel() for name in ("text_indices", "video_indices", "audio_indices")}
    if any(kw[name].dim() != 1 for name in counts):
        raise ValueError("text_indices, video_indices and audio_indices must be 1-D index tensors")
    if counts["text_indices"] != text.shape[1]:
        raise ValueError(
            f"text_indices must have one entry per text token ({text.shape[1]}, encoder_hidden_states' tokens) in a "
            f"NAG call, got {counts['text_indices']}"
        )
    if sum(counts.values()) != length:
        raise ValueError(
            f"text_indices, video_indices and audio_indices must cover the packed sequence ({length} rows, "
            f"position_ids) in a NAG call, got {counts['text_indices']} + {counts['video_indices']} + "
            f"{counts['audio_indices']}"
        )
    media = counts["video_indices"] + counts["audio_indices"]
    if degree > 1 and (text.shape[1] % degree or media % degree):
        raise ValueError(
            f"NAG on MiniMax-H3 under context parallelism of degree {degree} needs the text tokens "
            f"(encoder_hidden_states: {text.shape[1]}) and the media rows (video_indices + audio_indices: {media}) "
            f"each divisible by {degree}: every rank holds an equal chunk of positive text, NAG-negative text and "
            "media rows"
        )
    call_state.put(DEGREE, degree)


def _patch(model):
    return True


def _restore(model, undo) -> None:
    uncarry(model.token_refiner)  # what _check wrapped (gradient checkpointing of the token refiner)


class MiniMaxH3Family(Family):
    """MiniMax-H3's family: the NAG negative's text appended to the packed sequence (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        text, batch = kw[self.text], record.batch
        degree = call_state.take(DEGREE, 1) or 1
        kw[self.text] = pack(text, batch)
        text_rows, positions = kw["text_indices"], kw["position_ids"]
        length, text_len = positions.shape[0], text.shape[1]
        device = text_rows.device
        video, audio = kw["video_indices"].to(device), kw["audio_indices"].to(device)
        negative_rows = torch.arange(length, length + text_len, device=device, dtype=text_rows.dtype)
        media_rows = torch.cat([video, audio])
        # The new order: `degree` chunks of [positive text, negative text, media] (old row ids), and its inverse.
        order = torch.cat([rows_.reshape(degree, -1) for rows_ in (text_rows, negative_rows, media_rows)], dim=1)
        order = order.reshape(-1)
        new = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=device, dtype=order.dtype))
        for name in ("position_ids", "token_tags", "timestep_indices"):
            rows_ = text_rows.to(kw[name].device)
            kw[name] = torch.cat([kw[name], kw[name].index_select(0, rows_)]).index_select(0, order.to(kw[name].device))
        kw["text_indices"] = new.index_select(0, torch.cat([text_rows, negative_rows]))
        kw["video_indices"], kw["audio_indices"] = new.index_select(0, video), new.index_select(0, audio)
        fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(NAGForward)}
        super().deliver(kw, extra, MiniMaxH3Forward(**fields, degree=degree))


class MiniMaxH3Prompts(PromptAdapter):
    """The modular text-encoder step encodes a prompt with its own token count (no padding): the NAG negative is
    fitted to the prompt's (``fit_text``) before it is appended."""

    def append(self, result, negative: dict):
        for index in self.per_branch:
            ref, x = result[index], negative.get(index)
            if isinstance(ref, torch.Tensor) and isinstance(x, torch.Tensor) and x.dim() == ref.dim() == 3:
                negative = {**negative, index: fit_text(x, ref.shape[1])}
        return super().append(result, negative)


MINIMAX_H3 = MiniMaxH3Family(
    name="MiniMax-H3",
    modular=ModularSpec(
        model_names=("minimax-h3",),
        outputs={0: "prompt_embeds"},
        guider_inputs={"prompt_embeds": "encoder_hidden_states"},
    ),
    models=(MiniMaxH3Transformer3DModel,),
    token_order="text_first",
    acts_in="the self-attention of the transformer blocks over the packed sequence (media queries: conditioning, "
    "audio and target rows), the media rows shared by both branches (exact: the modulation depends on the timestep "
    "and modality tag only); the NAG negative's text is an extra segment of the packed sequence, refined per branch",
    processors={MiniMaxH3Attention: NAGMiniMaxH3AttnProcessor},
    prompts=MiniMaxH3Prompts(
        prompts={"nag_negative_prompt": "prompt"},
        embeds={"nag_negative_prompt_embeds": 0},
        per_branch=(0,),
        forwarded=("device",),
    ),
    pipelines={},
    defaults=DEFAULTS,
    guided_models=("transformer", "transformer_ref"),  # t2va / fl2va, ref2va: two checkpoint partitions
    timestep_scale=1000.0,
    timestep_value=lambda timestep: 1.0 - timestep.min(),  # t = 1 is clean: the noisiest rows' noise level
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    check=_check,
    patch=_patch,
    restore=_restore,
)
register_family(MINIMAX_H3)
