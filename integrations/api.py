"""``apply_nag`` / ``remove_nag``: one call on the user's pipeline or transformer, undone exactly."""

from __future__ import annotations

import torch

from . import flux  # noqa: F401  (registers FluxTransformer2DModel)
from . import pipeline as _pipeline
from .config import NAGConfig
from .registry import handler_for, supported_pipelines


def _is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _check_not_compiled(model, where: str) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise RuntimeError(
            f"{where} is already torch.compiled; apply_nag patches the eager model, so call apply_nag first and "
            "torch.compile afterwards (e.g. pipe.transformer = torch.compile(pipe.transformer))"
        )


def _apply_model(model, config: NAGConfig, where: str) -> None:
    _check_not_compiled(model, where)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_nag expects a diffusers pipeline or transformer, got {type(model).__name__}")
    handler = handler_for(model)
    if handler.is_applied(model):
        handler.set_config(model, config)  # a second apply_nag updates the settings; it never stacks
    else:
        handler.apply(model, config)


def apply_nag(
    pipe_or_transformer,
    *,
    nag_scale: float = 5.0,
    nag_tau: float = 2.5,
    nag_alpha: float = 0.25,
    nag_end: float = 1.0,
    norm: str = "l1",
    mode: str = "exact",
    backend: str = "auto",
):
    """Patch a diffusers pipeline or transformer in place for Normalized Attention Guidance; returns the same object.

    On a pipeline (``FluxPipeline``, ``FluxImg2ImgPipeline``, ``FluxInpaintPipeline``, ``FluxFillPipeline``,
    ``FluxControlPipeline``, ``FluxKontextPipeline``) the call accepts ``nag_negative_prompt``,
    ``nag_negative_prompt_2``, ``nag_negative_prompt_embeds`` (``[1 | prompts | images, seq_len, 4096]``),
    ``nag_negative_pooled_prompt_embeds`` (``[1 | prompts | images, 768]``) and ``nag_scale``/``nag_tau``/
    ``nag_alpha``/``nag_end`` (overriding the values given here), besides every usual argument. NAG acts when a NAG
    negative (or ``nag_scale``) is given and ``nag_scale > 1``; without NAG arguments the call is the stock call.

    On a ``FluxTransformer2DModel``: a forward whose ``encoder_hidden_states`` ``[2B, T, 4096]`` and
    ``pooled_projections`` ``[2B, 768]`` hold the positive rows then the NAG-negative rows, while ``hidden_states`` is
    ``[B, N, 64]``, applies NAG and returns ``[B, N, 64]``; ``timestep``/``guidance`` may have ``B`` or ``2B`` rows;
    ``joint_attention_kwargs`` keys ``nag_scale``, ``nag_tau``, ``nag_alpha``, ``nag_end`` override the values given
    here. Equal batches are a plain forward.

    Args:
        pipe_or_transformer: a supported diffusers pipeline, or its transformer. Not a torch.compiled one: apply
            first, compile afterwards.
        nag_scale: extrapolation scale (>= 1; 1 turns NAG off; typical 3-11, 5 for Flux).
        nag_tau: clamp of the norm ratio ``||z_guided|| / ||z_pos||`` (> 0; typical 2.5).
        nag_alpha: blend of the guided and the positive attention output, in [0, 1] (typical 0.25).
        nag_end: noise-level threshold in [0, 1]: NAG acts while the timestep ``t >= (1 - nag_end) * 1000``; 1.0
            keeps it on for every step.
        norm: ``"l1"`` (the paper's) or ``"l2"`` (the authors' diffusers Flux file).
        mode: ``"exact"`` (the authors' semantics, NAG.md section 3: the single-stream blocks run at ``2B`` image
            rows, ~1.7x the FLOPs of a plain step at 1024x1024) or ``"fast"`` (NAG.md section 4: the image stream
            stays at ``B`` rows in every block, only the text tokens are duplicated; image queries attend once over
            the image keys and per branch over the text keys, LSE-merged with the NAG combine fused in; ~1.1x).
            Fast mode equals exact mode in the double-stream blocks and is a different, cheaper definition in the
            single-stream blocks; its image quality against exact mode is not yet measured on real weights.
            Fast mode supports no attention mask and no context parallelism.
        backend: kernel backend for ``nag_kernels.nag`` / ``nag_kernels.nag_merge``: ``"auto"``, ``"triton"`` or
            ``"torch"``.

    Applying twice updates the settings, the mode included (it never stacks); ``remove_nag`` undoes everything.

    Example::

        >>> import torch
        >>> from diffusers import FluxPipeline
        >>> from nag_kernels.integrations import apply_nag
        >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
        >>> pipe = apply_nag(pipe.to("cuda"))
        >>> image = pipe(
        ...     "Portrait of AI researcher.",
        ...     nag_negative_prompt="Glasses.",
        ...     nag_scale=5.0,
        ...     guidance_scale=0.0,
        ...     num_inference_steps=4,
        ...     max_sequence_length=256,
        ... ).images[0]
    """
    config = NAGConfig(nag_scale, nag_tau, nag_alpha, nag_end, norm, mode, backend)
    if _is_pipeline(pipe_or_transformer):
        pipe = pipe_or_transformer
        name = _pipeline.stock_class(pipe).__name__
        transformer = getattr(pipe, "transformer", None)
        if transformer is None:
            raise TypeError(f"NAG does not support {name}; supported pipelines: {', '.join(supported_pipelines())}")
        _check_not_compiled(transformer, f"{name}.transformer")
        handler = handler_for(transformer)
        if name not in handler.pipelines:
            raise TypeError(
                f"NAG does not support {name} yet; supported pipelines: {', '.join(handler.pipelines)}"
            )
        _apply_model(transformer, config, f"{name}.transformer")
        _pipeline.patch(pipe)
        return pipe
    _apply_model(pipe_or_transformer, config, type(pipe_or_transformer).__name__)
    return pipe_or_transformer


def remove_nag(pipe_or_transformer):
    """Undo ``apply_nag`` completely (processors, hooks, patched forwards, the pipeline's call); returns the same object.

    Afterwards the outputs are bit-identical to a never-patched model. A no-op on an object that is not patched.
    """
    obj = pipe_or_transformer
    if _is_pipeline(obj):
        _pipeline.unpatch(obj)
        model = getattr(obj, "transformer", None)
    else:
        model = obj
    if isinstance(model, torch.nn.Module):
        try:
            handler = handler_for(model)
        except TypeError:
            return obj
        if handler.is_applied(model):
            handler.remove(model)
    return obj
