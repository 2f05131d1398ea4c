"""NAG for ``HiDreamImageTransformer2DModel`` (HiDream-I1 Full / Dev / Fast): docs/families/hidream.md.

HiDream-I1 runs double-stream blocks over ``[image, text]`` (text = T5 tokens, the last Llama layer's tokens and the
block's own Llama layer's tokens), then single-stream blocks over the joined sequence, with a mixture-of-experts
feed-forward on the image (double blocks) or on every token (single blocks). Its modulation ``temb`` is the timestep
embedding plus the pooled CLIP embedding, so it depends on the text: like FLUX.1, exact and fast modes differ.

One guided forward: ``hidden_states`` ``L`` latent rows; ``encoder_hidden_states_t5`` and ``pooled_embeds`` ``R = L +
g`` rows and ``encoder_hidden_states_llama3`` ``[layers, R, T, D]``: one row per latent row, then the NAG-negative
rows of the last ``g`` latent rows (``g = L``: the plain guided call, ``2B`` text rows; ``g < L``: the pipeline's
batched CFG, its unconditional rows first and unguided). ``guided.pre_hook`` reads the batches; the record travels
per thread (``call_state``: the model does not pass its attention kwargs to the blocks).

- ``HiDreamFamily.deliver`` gives the latents (and ``timesteps``, and ``img_ids`` / ``img_sizes`` /
  ``hidden_states_masks`` when given) ``R`` rows, the NAG-negative rows copying their latent row, so that the stock
  forward's per-row work (``temb``, the caption projections' ``.view(batch, -1, C)``, the text positions) sees one
  latent row per text row; ``_embed_forward`` (``x_embedder``) keeps the image stream at its ``L`` rows.
- ``_double_forward`` (every double block): the image stream at ``L`` rows, modulated with the ``temb`` rows of its
  own text rows (the positive ones: the first ``L``); the text stream at ``R`` rows, modulated per row. The last
  double block gives the image ``R`` rows again (each NAG-negative row a copy of its positive row): the layout the
  stock forward joins with the text before the single blocks.
- ``NAGHiDreamAttnProcessor`` wraps each stock ``HiDreamAttnProcessor``. Double blocks and fast-mode single blocks
  (image and text given apart): image Q/K/V once; text queries of each row over ``[its image ; its text]``; image
  queries of the guided rows split into the image keys (once) and each branch's text keys, LSE-merged and
  NAG-combined (``split_attention.image_attention``) before ``to_out``; unguided rows run the stock joint attention.
  Exact-mode single blocks (one ``R``-row sequence, the stock block computation): attention per row, the image part
  NAG-combined and written into both the positive and the NAG-negative row before ``to_out``.
- ``_single_forward`` (every single block): exact mode runs the stock block (the processor combines); fast mode keeps
  the image at ``L`` rows (positive modulation rows) and the text at ``R`` rows, and returns the ``R``-row joined
  layout the stock forward expects (the image rows copied to their NAG-negative rows).
- ``_final_forward`` (``final_layer``) keeps the first ``L`` rows (the positive ones) and ``_unpatchify`` the first
  ``L`` image sizes: the output has ``L`` rows.
- A forward pre-hook (``Family.patch``) drops the Llama rows past the T5 rows in a plain forward (NAG off at this
  step: past ``nag_end`` or ``nag_scale=1``, where the pre-hook already dropped the T5 and pooled NAG rows).

The MoE routes each token on its own (gate softmax and top-k per token), so every token sees the experts the stock
model would give it in the layout it is computed in. Plain forwards are the stock computation.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from diffusers.models.transformers.transformer_hidream_image import (
    HiDreamAttention,
    HiDreamAttnProcessor,
    HiDreamImageTransformer2DModel,
    apply_rope,
)

from .. import call_state, forward_patch, parallel
from ..family import Family, ForwardPatch, MethodPatch
from ..forward_patch import parameter_names
from ..guided import as_kwargs, rows
from ..pipeline import PromptAdapter
from ..processor import NAGProcessor
from ..registry import register_family
from ..split_attention import combine, image_attention

PIPELINES = {"HiDreamImagePipeline": {}}
T5, LLAMA, POOLED = "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"
# Forward arguments with one row per latent row that a guided forward gives R rows (HiDreamFamily.deliver).
PER_LATENT_ROW = ("hidden_states", "timesteps", "img_ids", "img_sizes", "hidden_states_masks")
_LLAMA_INDEX = 2  # encode_prompt's result: (t5, neg t5, llama3, neg llama3, pooled, neg pooled)


# A guided call under diffusers' parallelism is refused (one process only): parallel.refuse_without_plan.
_refuse_parallel = functools.partial(
    parallel.refuse_without_plan, model=HiDreamImageTransformer2DModel, family="HiDream-I1"
)


def _extend(x, g: int):
    """``x`` (``L`` rows) followed by its last ``g`` rows: the rows of the NAG-negative text rows."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x[-g:]])
    return type(x)([*x, *x[len(x) - g:]])


def _layout(nag):
    """``(L, g, p)``: latent rows, guided rows (the last ``g``), plain rows (the first ``p = L - g``)."""
    return nag.batch, nag.guided_rows, nag.batch - nag.guided_rows


def _rope(q, k, freqs):
    """The stock processor's RoPE (``apply_rope`` on the whole head, or on its first half when the tables are half as
    wide); ``freqs`` ``[rows, S, 1, D/2, 2, 2]`` for the tokens of ``q``/``k`` ``[rows, S, H, D]``."""
    if q.shape[-1] == freqs.shape[-3] * 2:
        return apply_rope(q, k, freqs)
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    q1, k1 = apply_rope(q1, k1, freqs)
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


def _heads(attn, x, dtype, text: bool = False):
    """The stock processor's Q/K/V of ``x [rows, S, C]`` (the text projections when ``text``) -> ``[rows, S, H, D]``."""
    to_q, to_k, to_v = (attn.to_q_t, attn.to_k_t, attn.to_v_t) if text else (attn.to_q, attn.to_k, attn.to_v)
    norm_q, norm_k = (attn.q_rms_norm_t, attn.k_rms_norm_t) if text else (attn.q_rms_norm, attn.k_rms_norm)
    q = norm_q(to_q(x)).to(dtype=dtype)
    k = norm_k(to_k(x)).to(dtype=dtype)
    v = to_v(x)
    head_dim = k.shape[-1] // attn.heads
    return tuple(t.view(t.shape[0], -1, attn.heads, head_dim) for t in (q, k, v))


def _join(image: torch.Tensor, text: torch.Tensor, plain: int) -> torch.Tensor:
    """Each text row's joint sequence ``[image of its latent row ; its text]``: ``image [L, N, ...]``, ``text [R, T,
    ...]`` -> ``[R, N + T, ...]``, the image rows written once each (rows past ``L`` take the image of latent row
    ``plain + (r - L)``)."""
    latent_rows, n = image.shape[0], image.shape[1]
    out = text.new_empty((text.shape[0], n + text.shape[1], *text.shape[2:]))
    out[:latent_rows, :n] = image
    out[latent_rows:, :n] = image[plain:]
    out[:, n:] = text
    return out


class NAGHiDreamAttnProcessor(NAGProcessor):
    """``HiDreamAttnProcessor`` with NAG: plain calls (no record on this thread) go to the wrapped stock processor;
    the calls of a guided forward's blocks run NAG's attention (module docstring). Same ``__call__`` signature."""

    stock = HiDreamAttnProcessor

    @property
    def _attention_backend(self):  # the stock HiDream processor has none (it calls SDPA itself)
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    def __call__(self, attn: HiDreamAttention, hidden_states, hidden_states_masks=None, encoder_hidden_states=None,
                 image_rotary_emb=None, *args, **kwargs):
        nag = call_state.record()
        if nag is None:
            return self.inner(attn, hidden_states, hidden_states_masks, encoder_hidden_states, image_rotary_emb,
                              *args, **kwargs)
        _refuse_parallel(self._parallel_config)
        if attn.single and encoder_hidden_states is None:
            return self._single(attn, hidden_states, hidden_states_masks, image_rotary_emb, nag)
        # Image and text apart: a double block, or a fast-mode single block (one set of projections).
        return self._split(attn, hidden_states, encoder_hidden_states, hidden_states_masks, image_rotary_emb, nag)

    def _split(self, attn, image, text, masks, freqs, nag):
        """Image ``[L, N, C]`` (modulated with its positive rows), text ``[R, T, C]`` -> ``(image [L, N, C], text [R,
        T, C])`` after the output projections."""
        latent_rows, guided, plain = _layout(nag)
        dtype, n = image.dtype, image.shape[1]
        q, k, v = _heads(attn, image, dtype)
        tq, tk, tv = _heads(attn, text, dtype, text=not attn.single)
        if masks is not None:  # the stock processor scales the keys by the mask (padding of non-square images)
            k = k * masks[:latent_rows, :n].view(latent_rows, -1, 1, 1)
            if attn.single:  # the single blocks' mask covers the text too (ones)
                tk = tk * masks[:, n:].view(text.shape[0], -1, 1, 1)
        q, k = _rope(q, k, freqs[:latent_rows, :n])
        tq, tk = _rope(tq, tk, freqs[:, n:])
        keys, values = _join(k, tk, plain), _join(v, tv, plain)
        text_out = self.attend(tq, keys, values)  # text queries of each row over [its image ; its text]
        g = slice(plain, None)
        if nag.mode == "fast" or self.backend_is_torch():
            image_out = image_attention(q[g], k[g], v[g], tk[g], tv[g], nag)  # [g, N, C], merged and combined
        else:  # exact mode under another attention backend: both branches' full attention through it, then combine
            both = self.attend(torch.cat([q[g], q[g]]), keys[g], values[g])
            image_out = combine(both[:guided], both[guided:], nag)
        if plain:  # batched CFG's unconditional rows: the stock joint attention
            image_out = torch.cat([self.attend(q[:plain], keys[:plain], values[:plain]), image_out])
        to_out_t = attn.to_out if attn.single else attn.to_out_t
        return attn.to_out(image_out), to_out_t(text_out)

    def _single(self, attn, hidden_states, masks, freqs, nag):
        """Exact mode: ``[R, N + T, C]`` (image rows tiled), attention per row, the guided rows' image part combined
        and written into the positive and the NAG-negative row."""
        latent_rows, _, plain = _layout(nag)
        count = hidden_states.shape[0]
        q, k, v = _heads(attn, hidden_states, hidden_states.dtype)
        if masks is not None:
            k = k * masks.view(count, -1, 1, 1)
        q, k = _rope(q, k, freqs)
        out = self.attend(q, k, v)  # [R, N + T, C]
        n = out.shape[1] - nag.text_len
        image = out[:, :n]
        combined = combine(image[plain:latent_rows], image[latent_rows:], nag)
        image = torch.cat([image[:plain], combined, combined])
        return attn.to_out(torch.cat([image, out[:, n:]], dim=1))


def _processor(block):
    processor = block.attn1.processor
    if not isinstance(processor, NAGHiDreamAttnProcessor):
        raise RuntimeError(
            f"NAG cannot guide this call: a block's attention uses {type(processor).__name__}, not NAG's processor "
            "(set after apply_nag?); call without NAG arguments, or call apply_nag again"
        )
    return processor


def _modulate(norm, x, shift, scale, wtype):
    return norm(x).to(dtype=wtype) * (1 + scale) + shift


def _embed_forward(self, *args, **kwargs):
    """``x_embedder`` of a model with double blocks: in a guided forward the image stream keeps its ``L`` rows
    (``deliver`` gave the latents ``R`` rows for the stock forward's per-row work)."""
    nag = call_state.record()
    kw = as_kwargs(self._nag_names, args, kwargs)
    latent = kw["latent"]
    if nag is not None and latent.shape[0] == nag.batch + nag.guided_rows:
        kw["latent"] = latent[: nag.batch]
    return forward_patch.call_previous(self, **kw)


def _double_forward(self, *args, **kwargs):
    """``HiDreamImageTransformerBlock.forward`` of a guided forward: image ``L`` rows with the positive modulation
    rows, text ``R`` rows; the last block (``_nag_last``) hands on the image at ``R`` rows."""
    nag = call_state.record()
    kw = as_kwargs(self._nag_names, args, kwargs)
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    _processor(self)
    latent_rows, guided, _ = _layout(nag)
    image, text, temb = kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"]
    if image.shape[0] == latent_rows + guided:  # a model whose x_embedder is not patched
        image = image[:latent_rows]
    wtype = image.dtype
    mod = self.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)
    shift_i, scale_i, gate_i, shift_mi, scale_mi, gate_mi = (m[:latent_rows] for m in mod[:6])
    shift_t, scale_t, gate_t, shift_mt, scale_mt, gate_mt = mod[6:]
    image_n = _modulate(self.norm1_i, image, shift_i, scale_i, wtype)
    text_n = _modulate(self.norm1_t, text, shift_t, scale_t, wtype)
    attn_i, attn_t = self.attn1(image_n, kw.get("hidden_states_masks"), text_n,
                                image_rotary_emb=kw.get("image_rotary_emb"))
    image = gate_i * attn_i + image
    text = gate_t * attn_t + text
    image = gate_mi * self.ff_i(_modulate(self.norm3_i, image, shift_mi, scale_mi, wtype)) + image
    text = gate_mt * self.ff_t(_modulate(self.norm3_t, text, shift_mt, scale_mt, wtype)) + text
    if self._nag_last:
        image = _extend(image, guided)
    return image, text


def _single_forward(self, *args, **kwargs):
    """``HiDreamImageSingleTransformerBlock.forward`` of a guided forward. Exact mode: the stock block on the ``R``
    rows (the processor combines). Fast mode: image ``L`` rows with the positive modulation rows, text ``R`` rows;
    returns the ``R``-row joined sequence (image rows copied to their NAG-negative rows)."""
    nag = call_state.record()
    kw = as_kwargs(self._nag_names, args, kwargs)
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    _processor(self)
    if nag.mode != "fast":
        return forward_patch.call_previous(self, **kw)
    latent_rows, guided, _ = _layout(nag)
    hidden, temb = kw["hidden_states"], kw["temb"]
    n = hidden.shape[1] - nag.text_len
    image, text = hidden[:latent_rows, :n], hidden[:, n:]
    wtype = hidden.dtype
    mod = self.adaLN_modulation(temb)[:, None].chunk(6, dim=-1)
    shift, scale, gate, shift_m, scale_m, gate_m = mod
    shift_i, scale_i, gate_i, shift_mi, scale_mi, gate_mi = (m[:latent_rows] for m in mod)
    image_n = _modulate(self.norm1_i, image, shift_i, scale_i, wtype)
    text_n = _modulate(self.norm1_i, text, shift, scale, wtype)
    attn_i, attn_t = self.attn1(image_n, kw.get("hidden_states_masks"), text_n,
                                image_rotary_emb=kw.get("image_rotary_emb"))
    image = gate_i * attn_i + image
    text = gate * attn_t + text
    image = gate_mi * self.ff_i(_modulate(self.norm3_i, image, shift_mi, scale_mi, wtype).to(dtype=wtype)) + image
    text = gate_m * self.ff_i(_modulate(self.norm3_i, text, shift_m, scale_m, wtype).to(dtype=wtype)) + text
    return torch.cat([_extend(image, guided), text], dim=1)


def _final_forward(self, *args, **kwargs):
    """``final_layer`` of a guided forward: the first ``L`` rows (the positive ones), with their ``temb`` rows."""
    nag = call_state.record()
    kw = as_kwargs(self._nag_names, args, kwargs)
    if nag is not None and kw["hidden_states"].shape[0] == nag.batch + nag.guided_rows:
        kw["hidden_states"], kw["temb"] = kw["hidden_states"][: nag.batch], kw["temb"][: nag.batch]
    return forward_patch.call_previous(self, **kw)


def _unpatchify(self, x, img_sizes, is_training):
    """``unpatchify`` of a guided forward: the image sizes of the ``L`` output rows (``deliver`` gave them ``R``)."""
    if call_state.record() is not None and img_sizes is not None and len(img_sizes) > x.shape[0]:
        img_sizes = img_sizes[: x.shape[0]]
    return type(self).unpatchify(self, x, img_sizes, is_training)


def _double_blocks(model):
    blocks = [wrapper.block for wrapper in model.double_stream_blocks]
    return [(block, {"_nag_last": index == len(blocks) - 1}) for index, block in enumerate(blocks)]


def _llama_shape(llama) -> tuple[int, int] | None:
    """``(rows, tokens)`` of the Llama states: a ``[layers, rows, T, D]`` tensor (as the pipeline gives them) or a
    sequence of per-layer ``[rows, T, D]`` tensors of one shape (the model indexes either by layer); None otherwise."""
    if isinstance(llama, torch.Tensor):
        return (llama.shape[1], llama.shape[2]) if llama.dim() == 4 else None
    if isinstance(llama, (list, tuple)) and llama and all(isinstance(x, torch.Tensor) for x in llama):
        shapes = {tuple(x.shape) for x in llama}
        return (llama[0].shape[0], llama[0].shape[1]) if len(shapes) == 1 and llama[0].dim() == 3 else None
    return None


def _llama_rows(llama, count: int):
    """The first ``count`` rows of the Llama states (either form of ``_llama_shape``)."""
    if isinstance(llama, torch.Tensor):
        return llama[:, :count]
    return type(llama)(x[:count] for x in llama)


def _check_rows(kw: dict, count: int) -> None:
    """The per-text-row arguments of a guided forward: ``count`` rows each (the Llama states along dim 1)."""
    llama = kw.get(LLAMA)
    shape = _llama_shape(llama)
    if shape is None:
        got = tuple(llama.shape) if isinstance(llama, torch.Tensor) else type(llama).__name__
        raise ValueError(
            f"{LLAMA} must be a [layers, rows, tokens, dim] tensor (or a sequence of per-layer [rows, tokens, dim] "
            f"tensors) in a NAG call, got {got}"
        )
    if shape[0] != count:
        raise ValueError(
            f"{LLAMA} must have {count} rows along dim 1 like {T5} (positive rows, then NAG-negative rows), got "
            f"{shape[0]}"
        )
    pooled = kw.get(POOLED)
    if rows(pooled) != count:
        raise ValueError(f"{POOLED} must have batch {count} like {T5}, got {rows(pooled)}")


def _check(model, kw: dict, batch: int) -> None:
    """Before a guided forward (``batch`` latent rows; the text rows are ``2 * batch``, or ``batch + g`` under batched
    CFG), also one whose NAG is off at this step."""
    _refuse_parallel(getattr(model, "_parallel_config", None))
    _check_rows(kw, rows(kw.get(T5)))


class HiDreamFamily(Family):
    """HiDream-I1's family: the stock forward's per-row work needs one latent row per text row (module docstring)."""

    def deliver(self, kw: dict, extra: dict, record) -> None:
        latent_rows, guided = record.batch, record.guided_rows
        count = latent_rows + guided
        _check_rows(kw, count)
        for name in PER_LATENT_ROW:
            n = rows(kw.get(name))
            if n is None or n == count:
                continue
            if n != latent_rows:
                raise ValueError(f"{name} must have batch {latent_rows} or {count} in a NAG call, got {n}")
            kw[name] = _extend(kw[name], guided)
        text_len = kw[T5].shape[1] + 2 * _llama_shape(kw[LLAMA])[1]  # T5, the last Llama layer, the block's
        super().deliver(kw, extra, dataclasses.replace(record, text_len=text_len))


def _patch(model):
    """A pre-hook after the guided pre-hook: a plain forward whose Llama states have more rows than its T5 states
    (NAG off at this step: the T5 and pooled NAG rows were dropped) drops those Llama rows too."""
    names = parameter_names(type(model).forward)

    def plain_llama_rows(module, args, kwargs):
        if call_state.record() is not None:
            return None
        kw = as_kwargs(names, args, kwargs)
        llama, t5 = kw.get(LLAMA), kw.get(T5)
        shape = _llama_shape(llama)
        if shape is None or not isinstance(t5, torch.Tensor) or t5.dim() != 3:
            return None
        if not t5.shape[0] < shape[0] <= 2 * t5.shape[0]:
            return None
        kw[LLAMA] = _llama_rows(llama, t5.shape[0])
        return (), kw

    return model.register_forward_pre_hook(plain_llama_rows, with_kwargs=True)


def _restore(model, handle) -> None:
    handle.remove()


class HiDreamPrompts(PromptAdapter):
    """HiDreamImagePipeline's ``encode_prompt`` returns ``(t5, neg t5, llama3, neg llama3, pooled, neg pooled)``; the
    Llama states ``[layers, rows, T, D]`` have their rows along dim 1, so the NAG negative's are appended there."""

    def encode_negative(self, encode, encode_args: dict, result, negatives: dict) -> dict:
        if not any(negatives.get(name) is not None for name in self.embeds):
            return super().encode_negative(encode, encode_args, result, negatives)
        images = result[self.per_branch[0]].shape[0]
        per_image = encode_args.get(self.per_image_arg) or 1
        return {index: _rows_of(name, negatives[name], images, per_image, 1 if index == _LLAMA_INDEX else 0)
                for name, index in self.embeds.items()}

    def append(self, result, negative: dict):
        out = list(result)
        names = {index: name for name, index in self.embeds.items()}
        for index in self.per_branch:
            ref, x = result[index], negative[index]
            dim = 1 if index == _LLAMA_INDEX else 0
            name = names.get(index, "the NAG negative's embeddings")
            if x.dim() != ref.dim() or _without(x.shape, dim) != _without(ref.shape, dim):
                raise ValueError(
                    f"{name} must have the shape {_shape_text(ref.shape, dim)} of the prompt's (same "
                    f"max_sequence_length), got {tuple(x.shape)}"
                )
            out[index] = torch.cat([ref, x.to(device=ref.device, dtype=ref.dtype)], dim=dim)
        return type(result)(out) if isinstance(result, tuple) else out


def _without(shape, dim: int) -> tuple:
    return tuple(s for i, s in enumerate(shape) if i != dim)


def _shape_text(shape, dim: int) -> str:
    return "(" + ", ".join("rows" if i == dim else str(s) for i, s in enumerate(shape)) + ")"


def _rows_of(name: str, x: torch.Tensor, images: int, per_image: int, dim: int) -> torch.Tensor:
    """A pre-encoded negative with 1, one per prompt or one per image rows (along ``dim``) -> one per image."""
    prompts = images // per_image
    if (x.dim() != 4) if dim else (x.dim() < 2):
        where = "[layers, rows, tokens, dim]" if dim else "a batch dim and the prompt's per-row shape"
        raise ValueError(f"{name} must have {where}, got {tuple(x.shape)}")
    n = x.shape[dim]
    if n == images:
        return x
    if n == 1:
        return x.expand(*x.shape[:dim], images, *x.shape[dim + 1:])
    if n == prompts:
        return x.repeat_interleave(per_image, dim=dim)  # the order of encode_prompt: each prompt's images together
    along = " along dim 1" if dim else ""
    raise ValueError(f"{name} must have 1, {prompts} (one per prompt) or {images} (one per image) rows{along}, got {n}")


HIDREAM = HiDreamFamily(
    name="HiDream-I1",
    models=(HiDreamImageTransformer2DModel,),
    token_order="image_first",
    acts_in="the joint attention of the double-stream blocks (image outputs, before to_out) and of the "
    "single-stream blocks (the image part, before to_out)",
    processors={HiDreamAttention: NAGHiDreamAttnProcessor},
    forward_patches=(
        ForwardPatch(_embed_forward, lambda model: [model.x_embedder] if len(model.double_stream_blocks) else []),
        ForwardPatch(_double_forward, _double_blocks),
        ForwardPatch(_single_forward, lambda model: [wrapper.block for wrapper in model.single_stream_blocks]),
        ForwardPatch(_final_forward, lambda model: [model.final_layer]),
    ),
    method_patches=(MethodPatch("unpatchify", _unpatchify),),
    patch=_patch,
    restore=_restore,
    prompts=HiDreamPrompts(
        prompts={"nag_negative_prompt": "prompt", "nag_negative_prompt_2": "prompt_2",
                 "nag_negative_prompt_3": "prompt_3", "nag_negative_prompt_4": "prompt_4"},
        embeds={"nag_negative_prompt_embeds_t5": 0, "nag_negative_prompt_embeds_llama3": _LLAMA_INDEX,
                "nag_negative_pooled_prompt_embeds": 4},
        per_branch=(0, _LLAMA_INDEX, 4),
        positive=("prompt", "prompt_embeds_t5", "prompt_embeds_llama3", "pooled_prompt_embeds"),
        forwarded=("device", "dtype", "num_images_per_prompt", "max_sequence_length", "lora_scale"),
        negative_kwargs=(("do_classifier_free_guidance", False),),
    ),
    pipelines=PIPELINES,
    defaults={"scale": 5.0, "tau": 2.5, "alpha": 0.25, "end": 1.0, "mode": "exact"},
    latents="hidden_states",
    text=T5,
    per_branch=(POOLED,),
    expand=("timesteps",),
    timestep="timesteps",
    timestep_scale=1.0,
    attention_kwargs="attention_kwargs",
    passes_attention_kwargs=False,
    batched_cfg=True,
    check=_check,
)
register_family(HIDREAM)
