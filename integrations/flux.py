"""NAG for ``FluxTransformer2DModel`` (FLUX.1 and everything built on it): "exact" mode (NAG.md section 3) and
"fast" mode (section 4).

How one guided forward runs (``B`` image rows, ``2B`` text rows = positive then NAG-negative):

- ``_transformer_pre_hook`` (a ``torch`` forward pre-hook on the transformer) reads the NAG parameters, expands
  ``timestep``/``guidance`` to ``2B`` and passes a ``NAGForward`` record to the attention processors through
  ``joint_attention_kwargs["nag"]``. A NAG-off call (``nag_scale = 1`` or past ``nag_end``) drops the negative rows
  here and runs as a plain forward.
- ``_positive_rows_forward`` replaces the ``forward`` of each double block's ``norm1`` and of ``norm_out``: it
  modulates the ``B``-row image stream with the positive rows of the ``2B``-row ``temb``.
- ``NAGFluxAttnProcessor`` wraps each stock ``FluxAttnProcessor``. Double blocks (both modes): image Q/K/V are
  computed once at ``B`` rows and shared by both branches; text queries attend per branch over ``[text_b ; image]``
  (``dispatch_attention_fn``, the user's backend); image queries attend once over the image keys and per branch over
  the text keys, and ``nag_merge`` LSE-merges the parts and NAG-combines the branches before ``to_out`` (back to ``B``
  rows): exactly the attention over ``[text_b ; image]``, ~40% less image-query work (``flux_fast.image_attention``).
  With an attention mask, a context-parallel config or a non-PyTorch attention backend, exact mode runs the unsplit
  per-branch attention through ``dispatch_attention_fn`` instead. Exact-mode single blocks: the image part of the
  attention output is combined and written into both halves before the MLP concat and ``proj_out``.
- ``_single_block_forward`` replaces every single block's ``forward``. Exact mode: the first one tiles the image
  tokens to ``2B``, the last one keeps the positive half. Fast mode: each block runs ``flux_fast.fast_single_block``
  (image stays at ``B`` rows).
- Both replacements are one shared function per role (``forward_patch``), not per-module wrappers, so regional
  compilation (``compile_repeated_blocks``) compiles each block class once instead of once per block.

Plain forwards (no ``"nag"`` record) go straight to the wrapped stock processor, so they are the stock computation.
Every decision is made on shapes or Python values, except the ``nag_end`` test (one scalar read per call, only when
``nag_end < 1``), so the patched model runs on meta tensors and under ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxTransformer2DModel,
)

import nag_kernels

from . import forward_patch
from .config import NAGConfig
from .flux_fast import added_qkv as _added_qkv
from .flux_fast import branch_join, fast_single_block, image_attention, rope, split_rope
from .flux_fast import heads as _heads
from .flux_fast import qkv as _qkv
from .registry import register_model

STATE_ATTR = "_nag_state"
# Keys of ``joint_attention_kwargs`` that NAG reads (and removes before the blocks see them).
CALL_KEYS = {"nag_scale": "scale", "nag_tau": "tau", "nag_alpha": "alpha", "nag_end": "end"}

PIPELINES = (
    "FluxPipeline",
    "FluxImg2ImgPipeline",
    "FluxInpaintPipeline",
    "FluxFillPipeline",
    "FluxControlPipeline",
    "FluxKontextPipeline",
)


@dataclasses.dataclass(frozen=True)
class NAGForward:
    """What the processors need for one guided forward: ``batch`` B (image rows), ``text_len`` (text tokens), the NAG
    parameters and ``mode`` (``"exact"`` or ``"fast"``)."""

    batch: int
    text_len: int
    scale: float
    tau: float
    alpha: float
    norm: str
    backend: str
    mode: str = "exact"


def _combine(z_pos: torch.Tensor, z_neg: torch.Tensor, nag: NAGForward, out: torch.Tensor | None = None):
    backend = nag.backend
    if backend == "auto" and z_pos.dtype == torch.float64:
        backend = "torch"  # the fused kernel is float32/16/bf16; "auto" means the fastest one that runs
    return nag_kernels.nag(z_pos, z_neg, nag.scale, nag.tau, nag.alpha, norm=nag.norm, out=out, backend=backend)


# diffusers' PyTorch-SDPA backends: exact mode may replace them by ``attention_with_lse`` (the same kernels) to split
# the image queries; any other backend the user chose (flash-attn, sage, ...) keeps running all of exact mode.
_TORCH_BACKENDS = frozenset(
    name
    for name in ("native", "_native_flash", "_native_efficient", "_native_math", "_native_cudnn")
    if name in AttentionBackendName._value2member_map_
)


def can_wrap(processor) -> bool:
    """Whether NAG can wrap ``processor``: the stock ``FluxAttnProcessor`` computation (class or subclass with the
    stock ``__call__``). An IP-Adapter or custom processor computes something else, so NAG refuses it."""
    return isinstance(processor, FluxAttnProcessor) and type(processor).__call__ is FluxAttnProcessor.__call__


# diffusers 0.35 has no context parallelism: its dispatch_attention_fn takes no parallel_config.
_DISPATCH_TAKES_PARALLEL_CONFIG = "parallel_config" in inspect.signature(dispatch_attention_fn).parameters

class NAGFluxAttnProcessor:
    """``FluxAttnProcessor`` with NAG: plain calls go to the wrapped stock processor, guided calls (a ``nag`` record
    from the transformer hook) run the exact-mode attention. Same ``__call__`` signature plus ``nag``; the
    ``_attention_backend``/``_parallel_config`` attributes are those of the wrapped processor, so
    ``set_attention_backend`` and context-parallel settings reach both paths."""

    def __init__(self, inner: FluxAttnProcessor):
        self.inner = inner

    @property
    def _attention_backend(self):
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)  # diffusers < 0.36 has no context parallelism

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def _attend(self, query, key, value, attention_mask=None):
        """Attention through ``dispatch_attention_fn`` (the user's backend): ``[B, S, H, D]`` -> ``[B, S, H * D]``."""
        extra = {"parallel_config": self._parallel_config} if _DISPATCH_TAKES_PARALLEL_CONFIG else {}
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, **extra
        )
        return out.flatten(2, 3).to(query.dtype)

    def _can_split(self, attention_mask, nag: NAGForward) -> bool:
        """Whether the image queries may be split (see the module docstring); fast mode requires it."""
        if attention_mask is None and self._parallel_config is None:
            if nag.mode == "fast":
                return True
            backend = self._attention_backend
            if backend is None:
                backend = _AttentionBackendRegistry._active_backend
            return getattr(backend, "value", backend) in _TORCH_BACKENDS
        if nag.mode == "fast":
            raise ValueError(
                "mode='fast' supports neither attention masks nor context-parallel configs (the split image "
                "attention has no mask/parallel path); use mode='exact'"
            )
        return False

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        nag: NAGForward | None = None,
    ):
        if nag is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            return self._double(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, nag)
        return self._single(attn, hidden_states, attention_mask, image_rotary_emb, nag)

    def _double(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, nag):
        # hidden_states [B, N, C] (image, once), encoder_hidden_states [2B, T, C] (positive then negative text).
        batch, text_len = nag.batch, encoder_hidden_states.shape[1]
        query, key, value = _heads(attn, *_qkv(attn, hidden_states), attn.norm_q, attn.norm_k)
        txt_q, txt_k, txt_v = _heads(
            attn, *_added_qkv(attn, encoder_hidden_states), attn.norm_added_q, attn.norm_added_k
        )
        if self._can_split(attention_mask, nag):
            text_rope, image_rope = split_rope(image_rotary_emb, text_len)
            query, key = rope(query, image_rope), rope(key, image_rope)
            txt_q, txt_k = rope(txt_q, text_rope), rope(txt_k, text_rope)
            # Text queries of each branch over [text_b ; image] (image K/V shared), through the user's backend.
            text = self._attend(txt_q, branch_join(txt_k, key), branch_join(txt_v, value))  # [2B, T, C]
            image = image_attention(query, key, value, txt_k, txt_v, nag)  # [B, N, C], merged and combined
        else:
            # Both branches see the same image Q/K/V: tile to 2B and join each branch's text in front.
            query = branch_join(txt_q, query)
            key = branch_join(txt_k, key)
            value = branch_join(txt_v, value)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            out = self._attend(query, key, value, attention_mask)  # [2B, T + N, C]
            image = out[:, text_len:]
            image = _combine(image[:batch], image[batch:], nag)  # [B, N, C]
            text = out[:, :text_len].contiguous()
        image = attn.to_out[1](attn.to_out[0](image))
        return image, attn.to_add_out(text)

    def single_fast(self, block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask, nag):
        """A whole single block in fast mode (``flux_fast.fast_single_block``); returns ``(text [2B], image [B])``."""
        self._can_split(attention_mask, nag)  # raises on a mask / context parallelism
        return fast_single_block(
            block, self._attend, hidden_states, encoder_hidden_states, temb, image_rotary_emb, nag
        )

    def _single(self, attn, hidden_states, attention_mask, image_rotary_emb, nag):
        # hidden_states [2B, T + N, C]: text tokens first, image tokens tiled to both halves by _single_block_forward.
        batch, text_len = nag.batch, nag.text_len
        query, key, value = _heads(attn, *_qkv(attn, hidden_states), attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query, key, value, attention_mask)  # [2B, T + N, C]
        image = out[:, text_len:]
        _combine(image[:batch], image[batch:], nag, out=image[:batch])  # in place, positive half
        image[batch:].copy_(image[:batch])  # the authors write the guided tokens into both halves
        return out


def _parameter_names(fn) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(fn).parameters if name != "self")


def _as_kwargs(names: tuple[str, ...], args, kwargs) -> dict:
    """Positional arguments by name (a plain zip: ``inspect.Signature.bind`` does not trace under torch.compile)."""
    kw = dict(zip(names, args))
    kw.update(kwargs)
    return kw


def _positive_rows_forward(self, *args, **kwargs):
    """``forward`` of the image stream's AdaLN (each double block's ``norm1``, and ``norm_out``): when the
    conditioning (argument ``self._nag_emb``) has twice the rows of ``x`` (a guided forward), use the first half (the
    positive rows). Stock code would fail on that shape, so plain forwards are untouched."""
    kw = _as_kwargs(self._nag_names, args, kwargs)
    x, emb = kw["x"], kw.get(self._nag_emb)
    if emb is not None and emb.shape[0] == 2 * x.shape[0]:
        kw[self._nag_emb] = emb[: x.shape[0]]
    return forward_patch.call_previous(self, **kw)


def _single_block_forward(self, *args, **kwargs):
    """``forward`` of every single block in a guided forward. Exact mode: the first block (the one that receives the
    ``B`` image rows) tiles them to ``2B``, the last one (``self._nag_last``) keeps the positive half. Fast mode: the
    block runs ``flux_fast.fast_single_block`` (the image stays at ``B`` rows)."""
    kw = _as_kwargs(self._nag_names, args, kwargs)
    jak = kw.get("joint_attention_kwargs") or {}
    nag = jak.get("nag")
    if nag is None:
        return forward_patch.call_previous(self, **kw)
    if nag.mode == "fast":
        processor = self.attn.processor
        if not isinstance(processor, NAGFluxAttnProcessor):
            raise TypeError(
                f"mode='fast' needs NAG's attention processor in every single block, but one has "
                f"{type(processor).__name__} (set after apply_nag?); call remove_nag and apply_nag again"
            )
        return processor.single_fast(
            self,
            kw["hidden_states"],
            kw["encoder_hidden_states"],
            kw["temb"],
            kw.get("image_rotary_emb"),
            jak.get("attention_mask"),
            nag,
        )
    if kw["hidden_states"].shape[0] == nag.batch:  # only the first single block gets the B-row image stream
        kw["hidden_states"] = torch.cat([kw["hidden_states"], kw["hidden_states"]])
    text, image = forward_patch.call_previous(self, **kw)
    if self._nag_last:
        image = image[: nag.batch]
    return text, image


# The attributes forward_patch.patch sets for the two functions above (removed again by remove_nag).
_SETTINGS = {_positive_rows_forward: ("_nag_names", "_nag_emb"), _single_block_forward: ("_nag_names", "_nag_last")}


@dataclasses.dataclass
class PipelineRun:
    """A pipeline call in progress (set by ``pipeline.py``): the NAG-negative embeds to append to the conditional
    transformer calls, and the unconditional (true CFG) text embeds, whose calls stay plain."""

    config: NAGConfig
    negative: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


@dataclasses.dataclass
class FluxNAGState:
    config: NAGConfig
    processors: dict  # attention module name -> the stock processor it had before apply
    patched: list  # (module, function) pairs whose forward forward_patch.patch replaced
    pre_hook: torch.utils.hooks.RemovableHandle
    names: tuple[str, ...]  # the transformer's forward parameters, in order
    run: PipelineRun | None = None


@torch.compiler.disable
def _noise_level(timestep: torch.Tensor) -> float | None:
    """The call's scheduler timestep in [0, 1000] (``timestep`` arrives divided by 1000); None on meta tensors."""
    if timestep.device.type == "meta":
        return None
    return float(timestep.reshape(-1)[0]) * 1000


def _is_on(config: NAGConfig, timestep: torch.Tensor | None) -> bool:
    if config.scale <= 1:
        return False
    if config.end >= 1 or timestep is None:
        return True
    level = _noise_level(timestep)
    return level is None or config.active_at(level)  # meta: count NAG as on (cost upper bound)


def _rows(name: str, x: torch.Tensor | None, batch: int, expand: bool) -> torch.Tensor | None:
    """``x`` with ``2 * batch`` rows (``expand``) or ``batch`` rows (NAG off), from ``batch`` or ``2 * batch``."""
    if x is None or x.dim() == 0:
        return x
    if x.shape[0] not in (batch, 2 * batch):
        raise ValueError(f"{name} must have batch {batch} or {2 * batch} in a NAG call, got {x.shape[0]}")
    if expand:
        return x if x.shape[0] == 2 * batch else torch.cat([x, x])
    return x[:batch]


def _transformer_pre_hook(module, args, kwargs):
    state: FluxNAGState = getattr(module, STATE_ATTR)
    kw = _as_kwargs(state.names, args, kwargs)
    jak = dict(kw.get("joint_attention_kwargs") or {})
    overrides = {CALL_KEYS[key]: jak.pop(key) for key in list(jak) if key in CALL_KEYS}
    if "joint_attention_kwargs" in kw or overrides:
        kw["joint_attention_kwargs"] = jak

    hidden = kw["hidden_states"]
    text, pooled = kw.get("encoder_hidden_states"), kw.get("pooled_projections")
    batch = hidden.shape[0]
    run = state.run
    config = (run.config if run is not None else state.config).replace(**overrides)

    if run is not None and text is not None and text.shape[0] == batch and text is not run.uncond:
        # Conditional call of a NAG pipeline call: append the NAG-negative rows (unless NAG is off at this step).
        if not _is_on(config, kw.get("timestep")):
            return (), kw
        if run.negative.shape[1:] != text.shape[1:] or run.negative.shape[0] != batch:
            raise ValueError(
                f"nag_negative_prompt_embeds {tuple(run.negative.shape)} must match the prompt embeds "
                f"{tuple(text.shape)} of the transformer call"
            )
        text = kw["encoder_hidden_states"] = torch.cat([text, run.negative.to(text.dtype)])
        pooled = kw["pooled_projections"] = torch.cat([pooled, run.negative_pooled.to(pooled.dtype)])

    if text is None or text.shape[0] == batch:
        return (), kw  # plain forward
    if text.shape[0] != 2 * batch:
        raise ValueError(
            f"encoder_hidden_states must have the batch of hidden_states ({batch}, plain) or twice it ({2 * batch}: "
            f"positive rows then NAG-negative rows), got {text.shape[0]}"
        )
    if pooled is None or pooled.shape[0] != 2 * batch:
        got = None if pooled is None else pooled.shape[0]
        raise ValueError(f"pooled_projections must have batch {2 * batch} like encoder_hidden_states, got {got}")

    on = _is_on(config, kw.get("timestep"))
    kw["timestep"] = _rows("timestep", kw.get("timestep"), batch, expand=on)
    kw["guidance"] = _rows("guidance", kw.get("guidance"), batch, expand=on)
    if not on:
        kw["encoder_hidden_states"], kw["pooled_projections"] = text[:batch], pooled[:batch]
        return (), kw
    jak["nag"] = NAGForward(
        batch, text.shape[1], config.scale, config.tau, config.alpha, config.norm, config.backend, config.mode
    )
    kw["joint_attention_kwargs"] = jak
    return (), kw


def _attention_modules(model: FluxTransformer2DModel) -> dict[str, FluxAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FluxAttention)}


def _patch(module: torch.nn.Module, fn, patched: list, **settings) -> None:
    if not forward_patch.is_patched(module):  # else ours is still in its chain, with its names (see _restore)
        settings["_nag_names"] = _parameter_names(module.forward)  # of the forward that ``fn`` will call
    forward_patch.patch(module, fn, **settings)
    patched.append((module, fn))


class FluxHandler:
    """Patches a ``FluxTransformer2DModel`` in place (processors, a pre-hook, patched forwards) and undoes it exactly."""

    name = "FluxTransformer2DModel"
    pipelines = PIPELINES

    def is_applied(self, model) -> bool:
        return hasattr(model, STATE_ATTR)

    def set_config(self, model, config: NAGConfig) -> None:
        # The mode is read per call (``NAGForward.mode``): the same processors and patches serve both modes.
        getattr(model, STATE_ATTR).config = config

    def apply(self, model: FluxTransformer2DModel, config: NAGConfig) -> None:
        attention = _attention_modules(model)
        refused = {name: type(m.processor).__name__ for name, m in attention.items() if not can_wrap(m.processor)}
        if refused:
            name, cls = next(iter(refused.items()))
            raise TypeError(
                f"NAG can only wrap the stock FluxAttnProcessor, but {name} uses {cls} "
                f"({len(refused)} attention module(s) in all). Remove IP-Adapters/custom processors first "
                "(e.g. pipe.unload_ip_adapter() or transformer.set_attn_processor(FluxAttnProcessor()))."
            )
        processors = {name: m.processor for name, m in attention.items()}
        patched: list = []
        try:
            for m in attention.values():
                m.set_processor(NAGFluxAttnProcessor(m.processor))
            for block in model.transformer_blocks:
                _patch(block.norm1, _positive_rows_forward, patched, _nag_emb="emb")
            _patch(model.norm_out, _positive_rows_forward, patched, _nag_emb="conditioning_embedding")
            singles = list(model.single_transformer_blocks)
            for index, block in enumerate(singles):  # every one: fast mode replaces each block's computation
                _patch(block, _single_block_forward, patched, _nag_last=index == len(singles) - 1)
        except BaseException:
            self._restore(model, processors, patched)
            raise
        # A torch pre-hook, not a diffusers hook, at the top level: accelerate's model offload rewrites the top-level
        # ``forward`` on every pipeline call and would drop a forward wrapper registered after it.
        handle = model.register_forward_pre_hook(_transformer_pre_hook, with_kwargs=True, prepend=True)
        names = _parameter_names(type(model).forward)
        setattr(model, STATE_ATTR, FluxNAGState(config, processors, patched, handle, names))

    def remove(self, model: FluxTransformer2DModel) -> None:
        state: FluxNAGState = getattr(model, STATE_ATTR)
        state.pre_hook.remove()
        self._restore(model, state.processors, state.patched)
        delattr(model, STATE_ATTR)

    @staticmethod
    def _restore(model, processors: dict, patched: list) -> None:
        for name, m in _attention_modules(model).items():
            # Only our own processor goes back; a processor set by the user after apply_nag stays.
            if isinstance(m.processor, NAGFluxAttnProcessor) and name in processors:
                m.set_processor(processors[name])
        for module, fn in reversed(patched):
            # False when another library wrapped the module after apply_nag: ours then stays inside its chain as a
            # pass-through (it acts only on a guided forward), and a later apply_nag reuses it.
            forward_patch.unpatch(module, fn, _SETTINGS[fn])


register_model(FluxTransformer2DModel, FluxHandler())
