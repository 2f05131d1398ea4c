"""Call-time NAG arguments on a diffusers pipeline, and the marking of its guided transformer call.

``patch(pipe)`` gives the pipeline instance a subclass of its own class (same name and module, so diffusers' name
lookups and ``save_pretrained`` are unchanged) whose ``__call__`` accepts the ``nag_*`` arguments and otherwise calls
the stock ``__call__``; ``unpatch`` puts the stock class back.

How the guided call is marked (docs/spec.md, "The guided call"): for the duration of a NAG call, ``encode_prompt``
is wrapped. The call that encodes the pipeline call's own prompt (its ``prompt`` / ``prompt_embeds`` arguments are
the call's) returns the positive conditioning with the NAG negative's rows appended, so the transformer calls that
use it carry ``2B`` text rows and ``B`` latents: the guided forward of the transformer contract (``guided.py``). Every
other encoding (the true-CFG negative prompt) and every transformer call made with it stays plain, whatever the
pipeline's order of calls. A family's ``PromptAdapter`` says how its pipelines encode a negative.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import warnings

import torch

from . import call_state
from .guided import state_of
from .registry import family_for_pipeline

SETTINGS = ("nag_scale", "nag_tau", "nag_alpha", "nag_end")
PIPELINE_CONFIG = "_nag_config"  # a patched pipeline's own settings (apply_nag's), in its __dict__
JOINED = "modular_nag_joined"  # call_state slot: the denoiser's NAG rows are already joined (NAGGuidance adds none)

_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class PromptAdapter:
    """How a family's pipelines encode a NAG negative with their own ``encode_prompt``.

    Attributes:
        prompts: NAG argument -> ``encode_prompt`` argument for the negative's text (``{"nag_negative_prompt":
            "prompt", "nag_negative_prompt_2": "prompt_2"}``); the first is required (``""`` when not given).
        embeds: NAG argument -> index in ``encode_prompt``'s result of the pre-encoded tensor it replaces
            (``{"nag_negative_prompt_embeds": 0, "nag_negative_pooled_prompt_embeds": 1}``); all or none given
            (but for ``optional`` ones). An argument whose name ends in ``_mask`` is a mask (any real dtype), the
            others embeddings (floating point).
        optional: the ``embeds`` that may be left out (``None``) when the others are given, as the stock pipeline
            takes its ``prompt_embeds`` without them (Qwen-Image: the mask, ``None`` when every token counts).
        per_branch: indices in ``encode_prompt``'s result of the tensors that get the negative's rows appended.
        positive: ``encode_prompt`` arguments that hold the call's own prompt (compared with the call's arguments of
            the same name), so the positive encoding is told from the others.
        forwarded: ``encode_prompt`` arguments passed on unchanged when encoding the negative.
        per_image_arg: the ``encode_prompt`` argument giving the rows per prompt (Wan: ``num_videos_per_prompt``).
        negative_kwargs: fixed ``encode_prompt`` arguments for the negative's encoding, as ``(name, value)`` pairs
            (e.g. ``(("do_classifier_free_guidance", False),)``: the negative needs no CFG negative of its own).
        call_patches: ``(method name, make)`` pairs: for the duration of a NAG call the pipeline's method is
            replaced by ``make(original)`` (e.g. a step that builds a per-latent-row tensor from the text rows).
    """

    prompts: dict
    embeds: dict
    per_branch: tuple[int, ...] = (0,)
    positive: tuple[str, ...] = ("prompt", "prompt_embeds")
    forwarded: tuple[str, ...] = ("device", "num_images_per_prompt", "max_sequence_length", "lora_scale")
    per_image_arg: str = "num_images_per_prompt"
    negative_kwargs: tuple = ()
    call_patches: tuple = ()
    optional: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.prompts, *self.embeds)

    def check_values(self, negatives: dict) -> None:
        """The values of the NAG-negative arguments, for every family (``_call`` runs it before the family's own
        ``check``): each element of a prompt list is a ``str``; a pre-encoded tensor (or each tensor of a list of
        them) holds data (not on the meta device: a real device, any one, since it is moved to the prompt's device
        and dtype like the stock pipelines' ``prompt_embeds``), and embeddings are floating point (an integer or
        bool tensor is refused, never cast)."""
        for name in self.prompts:
            value = negatives.get(name)
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if not isinstance(item, str):
                        raise TypeError(f"{name}[{index}] must be a str, got {type(item).__name__}")
        for name in self.embeds:
            value = negatives.get(name)
            items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
            for index, x in items:
                if not isinstance(x, torch.Tensor):
                    continue  # the family's check names what it takes
                where = name if index is None else f"{name}[{index}]"
                if x.device.type == "meta":
                    raise ValueError(
                        f"{where} is on the meta device (it holds no data); pass a tensor on a real device (it is "
                        "moved to the pipeline's device)"
                    )
                if name.endswith("_mask"):
                    if x.is_complex():
                        raise TypeError(f"{where} must be a bool, integer or floating-point mask, got {x.dtype}")
                elif not x.is_floating_point():
                    raise TypeError(
                        f"{where} must be a floating-point tensor (embeddings, e.g. from encode_prompt), got {x.dtype}"
                    )

    def check(self, negatives: dict) -> None:
        """Types and combinations of the NAG-negative arguments, before anything runs."""
        given = {name for name in self.embeds if negatives.get(name) is not None}
        required = [name for name in self.embeds if name not in self.optional]
        if given and not set(required) <= given:
            if self.optional:
                missing = [name for name in required if name not in given]
                raise ValueError(
                    f"{' and '.join(required)} must be given together ({' / '.join(self.optional)} optional): got "
                    f"{' and '.join(name for name in self.embeds if name in given)} without {' and '.join(missing)}"
                )
            raise ValueError(f"{' and '.join(self.embeds)} must be given together")
        if given and any(negatives.get(name) is not None for name in self.prompts):
            raise ValueError(f"give either {' / '.join(self.prompts)} or {' / '.join(self.embeds)}, not both")
        for name in self.prompts:
            value = negatives.get(name)
            if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value)):
                raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
        for name in self.embeds:
            x = negatives.get(name)
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")

    def is_positive(self, call_args: dict, encode_args: dict) -> bool:
        return all(encode_args.get(name) is call_args.get(name) for name in self.positive)

    def encode_negative(self, encode, encode_args: dict, result, negatives: dict) -> dict:
        """The NAG negative's tensors (result index -> tensor) with the rows of the positive ``result``."""
        first = result[self.per_branch[0]]
        per_image = encode_args.get(self.per_image_arg) or 1
        images = first.shape[0]
        if any(negatives.get(name) is not None for name in self.embeds):
            return {
                index: None if negatives.get(name) is None else _broadcast(name, negatives[name], images, per_image)
                for name, index in self.embeds.items()
            }  # None: an optional one left out
        prompts = images // per_image
        kwargs = {key: encode_args[key] for key in self.forwarded if key in encode_args}
        for name, argument in self.prompts.items():
            default = "" if name == next(iter(self.prompts)) else None
            kwargs[argument] = per_prompt(name, negatives.get(name, default) or default, prompts)
        kwargs.update(self.negative_kwargs)
        encoded = encode(**kwargs)
        return {index: encoded[index] for index in self.per_branch}

    def append(self, result, negative: dict):
        """``result`` with each per-branch tensor followed by the negative's rows (checked against it)."""
        out = list(result)
        names = {index: name for name, index in self.embeds.items()}
        for index in self.per_branch:
            ref, x = result[index], negative[index]
            name = names.get(index, "the NAG negative's embeddings")
            if x.shape[1:] != ref.shape[1:]:
                raise ValueError(
                    f"{name} must have the per-row shape {tuple(ref.shape[1:])} of the prompt's "
                    f"(same max_sequence_length), got {tuple(x.shape[1:])}"
                )
            out[index] = torch.cat([ref, x.to(device=ref.device, dtype=ref.dtype)])
        return type(result)(out) if isinstance(result, tuple) else out


def per_prompt(name: str, value, prompts: int):
    """``value`` (one NAG-negative string or a list) as one string per prompt."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) == 1:
        return values * prompts
    if len(values) != prompts:
        raise ValueError(f"{name} must be one string or a list of 1 or {prompts} (one per prompt), got {len(values)}")
    return values


def _broadcast(name: str, x: torch.Tensor, images: int, per_image: int) -> torch.Tensor:
    prompts = images // per_image
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dim and the per-row shape of the prompt's embeddings, got {tuple(x.shape)}")
    if x.shape[0] == images:
        return x
    if x.shape[0] == 1:
        return x.expand(images, *x.shape[1:])
    if x.shape[0] == prompts:
        return x.repeat_interleave(per_image, dim=0)  # the order of encode_prompt: each prompt's images together
    raise ValueError(f"{name} must have batch 1, {prompts} (one per prompt) or {images} (one per image), got {x.shape[0]}")


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
    with _CLASSES_LOCK:  # pipelines of one class patched from several threads get one subclass
        if base not in _CLASSES:
            _CLASSES[base] = _make_nag_class(base)
        return _CLASSES[base]


def _make_nag_class(base: type) -> type:
    family = family_for_pipeline(base.__name__)
    names = (*family.prompts.names, *SETTINGS)

    def __call__(self, *args, **kwargs):
        nag_args = {name: kwargs.pop(name) for name in names if name in kwargs}
        nag_args = {name: value for name, value in nag_args.items() if value is not None}
        return _call(self, base, family, args, kwargs, nag_args)

    __call__.__doc__ = (
        f"``{base.__name__}.__call__`` with Normalized Attention Guidance (nag-kernels). Extra arguments: "
        f"{', '.join(f'``{n}``' for n in names)} (one negative for all prompts or one per prompt; pre-encoded "
        "embeddings with batch 1, one per prompt or one per image; the settings override apply_nag's). NAG acts "
        "when a NAG negative or ``nag_scale`` is given and ``nag_scale > 1``; without NAG arguments this is the "
        "stock call.\n\n" + (base.__call__.__doc__ or "")
    )
    namespace = {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), namespace)


def _guided_models(pipe, family) -> list:
    models = []
    for attr in family.guided_models:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        model = getattr(model, "_orig_mod", model)  # torch.compile(transformer) after apply_nag
        if state_of(model) is None:
            raise RuntimeError(
                f"{type(pipe).__name__}.{attr} is not patched for NAG (it was replaced or passed to remove_nag after "
                "apply_nag(pipe)); call nag_kernels.integrations.apply_nag(pipe) again"
            )
        models.append(model)
    return models


def _nag_guider(pipe):
    """The pipeline's ``guider`` component when it is an enabled ``NAGGuidance`` (classic pipelines that take a guider,
    e.g. HunyuanVideo 1.5's): its NAG settings then drive every call, as on a modular pipeline."""
    guider = getattr(pipe, "guider", None)
    if guider is None or type(guider).__name__ != "NAGGuidance" or not getattr(guider, "_enabled", False):
        return None
    return guider


def _call(pipe, base: type, family, args, kwargs, nag_args: dict):
    guider = _nag_guider(pipe)
    if not nag_args and guider is None:
        return base.__call__(pipe, *args, **kwargs)
    if guider is None:
        return _nag_call(pipe, base, family, args, kwargs, nag_args, None)
    joined = call_state.peek(JOINED)
    call_state.put(JOINED, True)  # the guider adds no rows of its own here: a NAG call joins them in the encoding
    try:
        return _nag_call(pipe, base, family, args, kwargs, nag_args, guider)
    finally:
        call_state.put(JOINED, joined)


def _nag_call(pipe, base: type, family, args, kwargs, nag_args: dict, guider):
    models = _guided_models(pipe, family)
    settings = {key[len("nag_"):]: nag_args.get(key) for key in SETTINGS}
    defaults = pipe.__dict__.get(PIPELINE_CONFIG) or state_of(models[0]).config
    if guider is not None:  # the guider's own NAG fields over apply_nag's settings; the call's over both
        defaults = defaults.replace(scale=guider.nag_scale, tau=guider.nag_tau, alpha=guider.nag_alpha,
                                    end=guider.nag_end)
    config = defaults.replace(**settings)
    adapter = family.prompts
    negatives = {name: nag_args.get(name) for name in adapter.names}
    adapter.check_values(negatives)
    adapter.check(negatives)
    has_negative = any(value is not None for value in negatives.values())
    if config.scale <= 1 or not (has_negative or "nag_scale" in nag_args or guider is not None):
        return base.__call__(pipe, *args, **kwargs)

    call_args = inspect.signature(base.__call__).bind(pipe, *args, **kwargs).arguments
    original = pipe.encode_prompt
    signature = inspect.signature(original)
    done = []

    def encode_prompt(*a, **kw):
        result = original(*a, **kw)
        encode_args = signature.bind(*a, **kw).arguments
        if done or not adapter.is_positive(call_args, encode_args):
            return result  # another encoding (e.g. the true-CFG negative prompt): its calls stay plain
        done.append(True)
        negative = adapter.encode_negative(original, encode_args, result, negatives)
        return adapter.append(result, negative)

    pipe.__dict__["encode_prompt"] = encode_prompt
    for name, make in adapter.call_patches:
        pipe.__dict__[name] = make(getattr(pipe, name))
    try:
        with call_state.pipeline_call(config):
            out = base.__call__(pipe, *args, **kwargs)
        if not done:
            warnings.warn(
                f"NAG did not act in this {type(pipe).__name__} call: the pipeline never encoded the call's own "
                "prompt (e.g. it was given prompt_embeds, or rewrote the prompt before encoding it), so no "
                "transformer call carried the NAG negative; pass the prompt as text, or call the patched transformer "
                "with the 2B-row text conditioning (docs/spec.md, \"The guided call\")",
                stacklevel=3,
            )
        return out
    finally:
        pipe.__dict__.pop("encode_prompt", None)
        for name, _ in adapter.call_patches:
            pipe.__dict__.pop(name, None)
