"""``apply_nag`` / ``remove_nag`` / ``nag``: one call on the user's pipeline or model, undone exactly.

This module knows no model: what differs per family comes from its ``Family`` (``family.py``, found through
``registry.py``), the guided forward is ``guided.py``'s and the pipeline call ``pipeline.py``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from . import caches as _caches
from . import modular as _modular
from . import pipeline as _pipeline
from .config import NAGConfig
from .forward_patch import parameter_names
from .guided import STATE_ATTR, NAGState, post_hook, pre_hook, state_of, uncarry
from .install import install, uninstall
from .pipeline import PIPELINE_CONFIG
from .registry import family_for, family_for_pipeline, supported_pipelines


def _is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _check_not_compiled(model, where: str) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise RuntimeError(
            f"{where} is already torch.compiled; apply_nag patches the eager model, so call apply_nag first and "
            "torch.compile afterwards (e.g. pipe.transformer = torch.compile(pipe.transformer))"
        )


def _settings(family, pipeline_name: str | None, given: dict) -> NAGConfig:
    """The family's recommended settings for the pipeline, overridden by the values the user gave."""
    values = {**family.recommended(pipeline_name), **{k: v for k, v in given.items() if v is not None}}
    config = NAGConfig(**values)
    if config.mode not in family.modes:
        raise ValueError(f"{family.name} supports mode in {family.modes}, got {config.mode!r}")
    return config


def _apply_model(model, config: NAGConfig, where: str, owner=None) -> None:
    """Patch ``model`` for ``owner`` (a pipeline) or for direct calls (``owner=None``); on a patched model, update
    the settings and wrap the stock processors set since (never stacks, never unpatches). Undoes itself when it
    fails."""
    _check_not_compiled(model, where)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_nag expects a diffusers pipeline or model, got {type(model).__name__}")
    family = family_for(model)
    state = state_of(model)
    if state is not None:  # add only what is missing: forwards of other requests may be running on this model
        state.installed.merge(install(family, model))
        state.config = config
    else:
        installed = install(family, model)
        # A torch pre-hook, not a diffusers hook, at the top level: accelerate's model offload rewrites the top-level
        # ``forward`` on every pipeline call and would drop a forward wrapper registered after it.
        handle = model.register_forward_pre_hook(_caches.with_layout(pre_hook), with_kwargs=True, prepend=True)
        after = model.register_forward_hook(_end_of_forward, with_kwargs=True, always_call=True)
        names = parameter_names(type(model).forward)
        state = NAGState(family, config, installed, handle, names, after, weakref.WeakSet())
        setattr(model, STATE_ATTR, state)
    if owner is None:
        state.direct = True
    else:
        state.owners.add(owner)
    _caches.guard(model)  # diffusers' caches keep one state per batch layout while NAG is applied (caches.py)


def _end_of_forward(module, args, kwargs, output):
    """The forward hook of every patched model (also when the forward raised): the per-forward thread state ends
    with the forward (the record of a family whose record travels per thread, the caches' batch layout), so nothing
    of it leaks into the next forward or call on this thread."""
    post_hook(module, args, kwargs, output)
    _caches.forward_done()


def _remove_model(model) -> None:
    state: NAGState = state_of(model)
    state.pre_hook.remove()
    if state.post_hook is not None:
        state.post_hook.remove()
    uninstall(state.family, model, state.installed)
    uncarry(model)
    delattr(model, STATE_ATTR)
    _caches.unguard(model)


def _release_model(model, owner) -> None:
    """``owner`` (a pipeline) no longer needs NAG on ``model``: unpatch it unless another pipeline, or a direct
    ``apply_nag(model)``, still does."""
    state = state_of(model)
    if state is None:
        return
    state.owners.discard(owner)
    if not state.direct and not len(state.owners):
        _remove_model(model)


def _snapshot(model):
    state = state_of(model)
    return None if state is None else (state.config, set(state.owners), state.direct)


def _roll_back(model, before, owner) -> None:
    """Put ``model`` back as it was before an ``apply_nag`` that failed on a later model."""
    if state_of(model) is None:
        return
    if before is None:
        _remove_model(model)
        return
    state = state_of(model)
    state.config, owners, state.direct = before
    if owner not in owners:
        state.owners.discard(owner)


def apply_nag(
    pipe_or_transformer,
    config: NAGConfig | None = None,
    *,
    nag_scale: float | None = None,
    nag_tau: float | None = None,
    nag_alpha: float | None = None,
    nag_end: float | None = None,
    norm: str | None = None,
    mode: str | None = None,
    backend: str | None = None,
):
    """Patch a diffusers pipeline or model in place for Normalized Attention Guidance; returns the same object.

    On a supported pipeline the call accepts the NAG-negative arguments of its family (FLUX.1:
    ``nag_negative_prompt``, ``nag_negative_prompt_2``, ``nag_negative_prompt_embeds`` (``[1 | prompts | images,
    seq_len, 4096]``), ``nag_negative_pooled_prompt_embeds`` (``[1 | prompts | images, 768]``)) and ``nag_scale`` /
    ``nag_tau`` / ``nag_alpha`` / ``nag_end`` (overriding the values set here), besides every usual argument. NAG acts
    when a NAG negative (or ``nag_scale``) is given and ``nag_scale > 1``; without NAG arguments the call is the stock
    call. With true CFG, NAG guides the conditional pass only.

    On a model (e.g. ``FluxTransformer2DModel``): a forward whose text conditioning has ``2B`` rows (the positive
    rows, then the NAG-negative rows; FLUX.1: ``encoder_hidden_states`` ``[2B, T, 4096]`` and ``pooled_projections``
    ``[2B, 768]``) while the latents have ``B`` rows applies NAG and returns ``B`` rows; FLUX.1's ``timestep`` /
    ``guidance`` may have ``B`` or ``2B`` rows; the attention kwargs (FLUX.1: ``joint_attention_kwargs``) keys
    ``nag_scale``, ``nag_tau``, ``nag_alpha``, ``nag_end`` override the settings. Equal batches are a plain forward.

    Args:
        pipe_or_transformer: a supported diffusers pipeline, or its transformer. Not a torch.compiled one: apply
            first, compile afterwards.
        config: optional ``NAGConfig`` giving every setting at once (``apply_nag(pipe, NAGConfig(scale=7.0))``);
            the keyword arguments below override single fields of it. Without it, unset values take the family's
            recommendation for the pipeline.
        nag_scale: extrapolation scale (>= 1; 1 turns NAG off; typical 3-11). ``None``: the family's recommended
            value for this pipeline (docs/spec.md, "Recommended settings"; FLUX.1: 5).
        nag_tau: clamp of the norm ratio ``||z_guided|| / ||z_pos||`` (> 0). ``None``: recommended (FLUX.1: 2.5).
        nag_alpha: blend of the guided and the positive attention output, in [0, 1]. ``None``: recommended
            (FLUX.1: 0.25; SD3: 0.125; SDXL: 0.5).
        nag_end: noise-level threshold in [0, 1]: NAG acts while the scheduler timestep ``t >= (1 - nag_end) *
            1000``. ``None``: recommended (1.0 = every step; FLUX.1 Kontext: 0.25).
        norm: ``"l1"`` (the paper's; the default) or ``"l2"`` (the authors' diffusers Flux file).
        mode: ``"exact"`` (the authors' semantics, docs/spec.md "Exact mode on FLUX.1": FLUX.1's single-stream
            blocks run at ``2B`` image rows, ~1.7x the FLOPs of a plain step at 1024x1024) or ``"fast"`` ("Fast
            mode": the image stream stays at ``B`` rows in every block, only the text tokens are duplicated; image
            queries attend once over the image keys and per branch over the text keys, LSE-merged with the NAG
            combine fused in; ~1.1x). On FLUX.1 fast mode equals exact mode in the double-stream blocks and is a
            different, cheaper definition in the single-stream blocks. ``None``: the family's default.
        backend: kernel backend for ``nag_kernels.nag`` / ``nag_kernels.nag_merge``: ``"auto"`` (the default),
            ``"triton"`` or ``"torch"``.

    Applying twice updates the settings, the mode included (it never stacks); ``remove_nag`` undoes everything;
    ``with nag(pipe, ...):`` does both. Settings belong to the pipeline they were applied to: pipelines sharing a
    transformer (one pipeline per request over shared components) each keep their own, and concurrent calls never
    see each other's. The shared model stays patched until the last pipeline that applied NAG to it is passed to
    ``remove_nag``. A refused ``apply_nag`` leaves nothing patched.

    Example::

        >>> import torch
        >>> from diffusers import FluxPipeline
        >>> from nag_kernels.integrations import apply_nag
        >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
        >>> pipe = apply_nag(pipe.to("cuda"))
        >>> image = pipe(
        ...     "Portrait of AI researcher.",
        ...     nag_negative_prompt="Glasses.",
        ...     guidance_scale=0.0,
        ...     num_inference_steps=4,
        ...     max_sequence_length=256,
        ... ).images[0]
    """
    given = dict(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, end=nag_end, norm=norm, mode=mode, backend=backend)
    if config is not None:  # torchao's form: every setting from the config, keywords override single fields
        if not isinstance(config, NAGConfig):
            raise TypeError(f"config must be a NAGConfig, got {type(config).__name__}")
        given = {**dataclasses.asdict(config), **{k: v for k, v in given.items() if v is not None}}
    if _modular.is_modular(pipe_or_transformer):  # a ModularPipeline: modular.py (docs/modular.md)
        return _modular.apply(pipe_or_transformer, given)
    if _is_pipeline(pipe_or_transformer):
        pipe = pipe_or_transformer
        name = _pipeline.stock_class(pipe).__name__
        family = family_for_pipeline(name)
        if family is None:
            raise TypeError(f"NAG does not support {name} yet; supported pipelines: {', '.join(supported_pipelines())}")
        config = _settings(family, name, given)
        models = [(attr, getattr(pipe, attr, None)) for attr in family.guided_models]
        models = [(attr, model) for attr, model in models if model is not None]
        if not models:
            raise TypeError(f"{name} has none of {family.guided_models}; NAG has nothing to patch")
        for attr, model in models:
            _check_not_compiled(model, f"{name}.{attr}")
            if family_for(model) is not family:
                raise TypeError(f"{name}.{attr} is a {type(model).__name__}, which {family.name}'s NAG does not patch")
        before = [(model, _snapshot(model)) for _, model in models]
        try:  # all or nothing: a model refused after another was patched leaves nothing patched
            for attr, model in models:
                _apply_model(model, config, f"{name}.{attr}", owner=pipe)
        except BaseException:
            for model, snapshot in before:
                _roll_back(model, snapshot, pipe)
            raise
        pipe.__dict__[PIPELINE_CONFIG] = config
        _pipeline.patch(pipe)
        return pipe
    model = pipe_or_transformer
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_nag expects a diffusers pipeline or model, got {type(model).__name__}")
    _check_not_compiled(model, type(model).__name__)
    _apply_model(model, _settings(family_for(model), None, given), type(model).__name__)
    return model


def remove_nag(pipe_or_transformer):
    """Undo ``apply_nag`` completely (processors, hooks, patched forwards, the pipeline's call); returns the same object.

    Afterwards the outputs are bit-identical to a never-patched model. A no-op on an object that is not patched.
    """
    obj = pipe_or_transformer
    if _modular.is_modular(obj):
        return _modular.remove(obj)
    if _is_pipeline(obj):
        _pipeline.unpatch(obj)
        obj.__dict__.pop(PIPELINE_CONFIG, None)
        for model in _models_of(obj):
            _release_model(model, obj)
    elif isinstance(obj, torch.nn.Module) and state_of(obj) is not None:
        _remove_model(obj)
    return obj


@contextlib.contextmanager
def nag(pipe_or_transformer, **settings):
    """``apply_nag(pipe_or_transformer, **settings)`` for the duration of a ``with`` block, undone on exit.

    On an object that was already patched, the exit restores its earlier settings instead of removing NAG. Another
    pipeline sharing the same model keeps its own settings throughout.

    Example::

        >>> with nag(pipe, nag_scale=7.0):
        ...     image = pipe("a cat", nag_negative_prompt="blurry").images[0]
        >>> image = pipe("a cat").images[0]  # the stock pipeline again
    """
    obj = pipe_or_transformer
    if _modular.is_modular(obj):
        before = _modular.own_config(obj)
        apply_nag(obj, **settings)
        try:
            yield obj
        finally:
            if before is None:
                _modular.remove(obj)
            else:
                _modular.restore_config(obj, before)
        return
    before = _own_config(obj)
    apply_nag(obj, **settings)
    try:
        yield obj
    finally:
        if before is None:
            remove_nag(obj)
        elif _is_pipeline(obj):
            obj.__dict__[PIPELINE_CONFIG] = before
        elif state_of(obj) is not None:
            state_of(obj).config = before


def _own_config(obj):
    """The settings ``obj`` itself was patched with (a pipeline's own, or a directly patched model's), else None."""
    if _is_pipeline(obj):
        return obj.__dict__.get(PIPELINE_CONFIG) if _pipeline.is_patched(obj) else None
    state = state_of(obj) if isinstance(obj, torch.nn.Module) else None
    return state.config if state is not None and state.direct else None


def _models_of(obj) -> list:
    if not _is_pipeline(obj):
        return [obj]
    family = family_for_pipeline(_pipeline.stock_class(obj).__name__)
    names = family.guided_models if family is not None else ("transformer",)
    return [m for m in (getattr(obj, attr, None) for attr in names) if isinstance(m, torch.nn.Module)]
