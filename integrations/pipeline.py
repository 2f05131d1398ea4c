"""Call-time NAG arguments on a diffusers pipeline, and the NAG-negative prompt encoding.

``patch(pipe)`` gives the pipeline instance a subclass of its own class (same name and module, so diffusers' name
lookups and ``save_pretrained`` are unchanged) whose ``__call__`` accepts the ``nag_*`` arguments and otherwise calls
the stock ``__call__``; ``unpatch`` puts the stock class back. For a NAG call it:

1. wraps ``pipe.encode_prompt`` for the duration of the call (an instance attribute, removed afterwards). The first
   call encodes the prompt: the wrapper encodes the NAG negative with the same device, ``num_images_per_prompt``,
   ``max_sequence_length`` and LoRA scale (or broadcasts the given NAG-negative embeds) and checks its shape. A
   second call encodes the true-CFG negative: its embeds are remembered so that those transformer calls stay plain.
2. sets ``PipelineRun`` on the transformer's NAG state; the transformer pre-hook (``flux.py``) appends the
   NAG-negative rows to every conditional call while NAG is on.
"""

from __future__ import annotations

import inspect

import torch

from .flux import STATE_ATTR, PipelineRun
from .registry import handler_for

NAG_ARGS = (
    "nag_negative_prompt",
    "nag_negative_prompt_2",
    "nag_negative_prompt_embeds",
    "nag_negative_pooled_prompt_embeds",
    "nag_scale",
    "nag_tau",
    "nag_alpha",
    "nag_end",
)

_CLASSES: dict[type, type] = {}


def is_patched(pipe) -> bool:
    return type(pipe) in _CLASSES.values()


def stock_class(pipe) -> type:
    return type(pipe).__bases__[0] if is_patched(pipe) else type(pipe)


def patch(pipe) -> None:
    if not is_patched(pipe):
        pipe.__class__ = _nag_class(type(pipe))


def unpatch(pipe) -> None:
    if is_patched(pipe):
        pipe.__class__ = stock_class(pipe)


def _nag_class(base: type) -> type:
    if base in _CLASSES:
        return _CLASSES[base]

    def __call__(
        self,
        *args,
        nag_negative_prompt: str | list[str] | None = None,
        nag_negative_prompt_2: str | list[str] | None = None,
        nag_negative_prompt_embeds: torch.Tensor | None = None,
        nag_negative_pooled_prompt_embeds: torch.Tensor | None = None,
        nag_scale: float | None = None,
        nag_tau: float | None = None,
        nag_alpha: float | None = None,
        nag_end: float | None = None,
        **kwargs,
    ):
        nag = {name: value for name, value in locals().items() if name in NAG_ARGS and value is not None}
        return _call(self, base, args, kwargs, nag)

    __call__.__doc__ = (
        f"``{base.__name__}.__call__`` with Normalized Attention Guidance (nag-kernels). Extra arguments: "
        "``nag_negative_prompt``/``nag_negative_prompt_2`` (str or list, one per prompt or one for all), "
        "``nag_negative_prompt_embeds``/``nag_negative_pooled_prompt_embeds`` (batch 1, one per prompt or one per "
        "image), ``nag_scale``, ``nag_tau``, ``nag_alpha``, ``nag_end`` (override the apply_nag values). NAG acts "
        "when a NAG negative or ``nag_scale`` is given and ``nag_scale > 1``; without NAG arguments this is the "
        "stock call.\n\n" + (base.__call__.__doc__ or "")
    )
    namespace = {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__}
    _CLASSES[base] = type(base.__name__, (base,), namespace)
    return _CLASSES[base]


def _call(pipe, base: type, args, kwargs, nag: dict):
    if not nag:
        return base.__call__(pipe, *args, **kwargs)
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile(transformer) after apply_nag
    handler = handler_for(transformer)
    if not handler.is_applied(transformer):
        raise RuntimeError(
            f"{type(pipe).__name__}.transformer is not patched for NAG (it was replaced or passed to remove_nag "
            "after apply_nag(pipe)); call nag_kernels.integrations.apply_nag(pipe) again"
        )
    state = getattr(transformer, STATE_ATTR)
    config = state.config.replace(
        scale=nag.get("nag_scale"), tau=nag.get("nag_tau"), alpha=nag.get("nag_alpha"), end=nag.get("nag_end")
    )
    negatives = {key: nag.get(key) for key in NAG_ARGS[:4]}
    _check_negatives(negatives)
    has_negative = any(value is not None for value in negatives.values())
    if config.scale <= 1 or not (has_negative or "nag_scale" in nag):
        return base.__call__(pipe, *args, **kwargs)

    run = PipelineRun(config)
    original = pipe.encode_prompt
    signature = inspect.signature(original)
    encoded = []

    def encode_prompt(*a, **kw):
        result = original(*a, **kw)
        encoded.append(result[0])
        if len(encoded) == 1:
            _encode_negative(run, original, signature.bind(*a, **kw).arguments, result, negatives)
        elif len(encoded) == 2:
            embeds = result[0]
            if embeds is encoded[0]:  # the same tensor for both: an alias tells the transformer hook they differ
                embeds = embeds.view_as(embeds)
                result = (embeds, *result[1:])
            run.uncond = embeds
        return result

    pipe.__dict__["encode_prompt"] = encode_prompt
    state.run = run
    try:
        return base.__call__(pipe, *args, **kwargs)
    finally:
        state.run = None
        pipe.__dict__.pop("encode_prompt", None)


def _check_negatives(negatives: dict) -> None:
    embeds, pooled = negatives["nag_negative_prompt_embeds"], negatives["nag_negative_pooled_prompt_embeds"]
    if (embeds is None) != (pooled is None):
        raise ValueError(
            "nag_negative_prompt_embeds and nag_negative_pooled_prompt_embeds must be given together "
            "(T5 embeds [batch, seq_len, joint_attention_dim] and CLIP pooled [batch, pooled_projection_dim])"
        )
    if embeds is not None and (negatives["nag_negative_prompt"] is not None or negatives["nag_negative_prompt_2"]):
        raise ValueError("give either nag_negative_prompt(_2) or nag_negative_prompt_embeds, not both")
    for name in ("nag_negative_prompt", "nag_negative_prompt_2"):
        value = negatives[name]
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value)):
            raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
    for name, x, dims in (("nag_negative_prompt_embeds", embeds, 3), ("nag_negative_pooled_prompt_embeds", pooled, 2)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != dims):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a {dims}-dim tensor, got {got}")


def _per_prompt(name: str, value, prompts: int):
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) == 1:
        return values * prompts
    if len(values) != prompts:
        raise ValueError(f"{name} must be one string or a list of 1 or {prompts} (one per prompt), got {len(values)}")
    return values


def _broadcast(name: str, x: torch.Tensor, images: int, per_prompt: int) -> torch.Tensor:
    prompts = images // per_prompt
    if x.shape[0] == images:
        return x
    if x.shape[0] == 1:
        return x.expand(images, *x.shape[1:])
    if x.shape[0] == prompts:
        return x.repeat_interleave(per_prompt, dim=0)  # the order of encode_prompt: each prompt's images together
    raise ValueError(
        f"{name} must have batch 1, {prompts} (one per prompt) or {images} (one per image), got {x.shape[0]}"
    )


def _encode_negative(run: PipelineRun, encode, arguments: dict, result, negatives: dict) -> None:
    embeds, pooled = result[0], result[1]
    per_prompt = arguments.get("num_images_per_prompt") or 1
    images = embeds.shape[0]
    if negatives["nag_negative_prompt_embeds"] is not None:
        negative = _broadcast("nag_negative_prompt_embeds", negatives["nag_negative_prompt_embeds"], images, per_prompt)
        negative_pooled = _broadcast(
            "nag_negative_pooled_prompt_embeds", negatives["nag_negative_pooled_prompt_embeds"], images, per_prompt
        )
    else:
        prompts = images // per_prompt
        prompt = _per_prompt("nag_negative_prompt", negatives["nag_negative_prompt"] or "", prompts)
        prompt_2 = _per_prompt("nag_negative_prompt_2", negatives["nag_negative_prompt_2"], prompts)
        extra = {key: arguments[key] for key in ("device", "max_sequence_length", "lora_scale") if key in arguments}
        negative, negative_pooled = encode(
            prompt=prompt, prompt_2=prompt_2, num_images_per_prompt=per_prompt, **extra
        )[:2]
    for name, x, ref in (
        ("nag_negative_prompt_embeds", negative, embeds),
        ("nag_negative_pooled_prompt_embeds", negative_pooled, pooled),
    ):
        if x.shape[1:] != ref.shape[1:]:
            what = "(seq_len, width)" if x.dim() == 3 else "(width,)"
            raise ValueError(
                f"{name} must have {what} = {tuple(ref.shape[1:])} like the prompt embeds "
                f"(same max_sequence_length), got {tuple(x.shape[1:])}"
            )
    run.negative = negative.to(device=embeds.device, dtype=embeds.dtype)
    run.negative_pooled = negative_pooled.to(device=pooled.device, dtype=pooled.dtype)
