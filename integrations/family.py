"""What differs between model families, declared in one place per family.

A ``Family`` is model knowledge only: the model classes it patches, the token order of its joint sequence, where NAG
acts, its NAG processor per attention class (``processors``), the module forwards and methods it replaces
(``forward_patches``, ``method_patches``), the names of the conditioning arguments of its forward (``guided.pre_hook``
reads them), its recommended settings per pipeline, the pipelines it drives and how they encode a NAG negative
(``prompts``, a ``pipeline.PromptAdapter``). The core derives the rest from it: patching and its exact undo, and the
processor check before a guided forward (``install.py``). A new family is one module in ``families/`` that builds a
``Family`` and calls ``registry.register_family`` (docs/adding-a-family.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from . import call_state


def _the_model(model):
    return (model,)


@dataclasses.dataclass(frozen=True)
class ForwardPatch:
    """Give modules of a model one shared ``forward`` (``forward_patch.patch``; one function for every module, so
    regional compilation compiles each block class once).

    Attributes:
        fn: the forward, called as ``fn(module, *args, **kwargs)``; it reads positional arguments by name from
            ``module._nag_names`` and its settings as attributes of ``module``, and calls
            ``forward_patch.call_previous`` for the stock computation.
        modules: ``modules(model)`` -> the modules to patch, each a module or a ``(module, settings)`` pair
            (``settings``: attribute name -> a string, number or tuple of those, set on the module for ``fn``).
    """

    fn: Callable
    modules: Callable


@dataclasses.dataclass(frozen=True)
class MethodPatch:
    """Bind ``fn`` as the method ``name`` of each module ``modules(model)`` returns (an instance attribute, removed
    again by ``remove_nag`` when it is still ours). ``fn(module, *args, **kwargs)``."""

    name: str
    fn: Callable
    modules: Callable = _the_model


TOKEN_ORDERS = ("text_first", "image_first", "cross_attention")


@dataclasses.dataclass(eq=False)
class Family:
    """One model family.

    Attributes:
        name: the family's name in messages and docs, e.g. ``"FLUX.1"``.
        models: the diffusers model classes it patches.
        token_order: ``"text_first"`` (joint sequence ``[text, image]``), ``"image_first"`` (``[image, text]``) or
            ``"cross_attention"`` (image queries, text keys/values only).
        acts_in: where NAG acts, in words (shown by ``describe``).
        patch, restore: optional extra patching the declarations below cannot express: ``patch(model) -> undo``
            (anything), ``restore(model, undo)``. Most families need neither.
        prompts: the pipeline adapter (``pipeline.PromptAdapter``): how a NAG negative is encoded and appended to
            the conditional call's text conditioning.
        pipelines: supported pipeline class name -> the recommended settings that differ from ``defaults`` there
            (e.g. ``{"FluxKontextPipeline": {"end": 0.25}}``).
        defaults: recommended ``NAGConfig`` fields for the family (``scale``, ``tau``, ``alpha``, ``end``, ``mode``).
        guided_models: the pipeline attributes holding models this family guides (``("transformer",)``; Wan 2.2 A14B
            has two experts).
        latents, text: forward arguments holding the latents (batch ``B``) and the text conditioning (``2B`` rows in
            a guided forward).
        per_branch: other forward arguments with one row per text row (``2B`` in a guided forward), e.g. FLUX.1's
            ``pooled_projections``.
        expand: forward arguments given with ``B`` or ``2B`` rows that a guided forward needs at ``2B`` (FLUX.1:
            ``timestep``, ``guidance``, since its text stream is modulated per branch).
        timestep, timestep_scale: the timestep argument and the factor that maps it to a scheduler timestep in
            [0, 1000] (FLUX.1 passes ``t / 1000``: 1000), or ``timestep_scale(model) -> float`` where it depends on
            the model's configuration (Sana-Sprint's timestep is in [0, 1], Sana's in [0, 1000]).
        attention_kwargs: the forward argument through which the ``NAGForward`` record reaches the processors (and
            through which a call may override ``nag_scale`` ...).
        passes_attention_kwargs: whether the model's forward passes those kwargs down to the attention processors.
            When it does not (Wan, LTX-Video), the record travels per thread: ``call_state.record()``.
        modes: the modes the family implements.
        batched_cfg: whether the family's pipelines batch CFG's unconditional and conditional rows into one call
            (SDXL, SD3): then a call with ``L`` latent rows and ``L + g`` text rows (``0 < g < L``) is guided on its
            last ``g`` latent rows, whose NAG-negative text rows are the last ``g`` (``NAGForward.guided``).
        timestep_value: optional ``timestep_value(timestep) -> tensor`` giving the scalar that ``nag_end`` is tested
            on (default: the first element; Wan uses the maximum over its per-token timesteps).
        check: optional ``check(model, kw, batch)`` raising a clear error on a guided forward's inputs that the batch rule
            alone does not catch.
        processors: attention class -> the NAG processor class that wraps its stock processor
            (``processor.NAGProcessor`` subclasses); every module of those classes gets one.
        forward_patches, method_patches: the module forwards and methods the family replaces (``ForwardPatch``,
            ``MethodPatch``).
        modular: the family's modular diffusers blocks (``modular_spec.ModularSpec``), or ``None`` when it has none.
        guided_attention: optional ``guided_attention(name, module) -> bool``: which attention modules of the
            ``processors`` classes a guided forward needs NAG's processor on (default: all; SDXL and Wan: the
            cross-attention ones).
    """

    name: str
    models: tuple[type, ...]
    token_order: str
    acts_in: str
    patch: Callable | None = None
    restore: Callable | None = None
    prompts: object = None
    pipelines: dict[str, dict] = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)
    guided_models: tuple[str, ...] = ("transformer",)
    latents: str = "hidden_states"
    text: str = "encoder_hidden_states"
    per_branch: tuple[str, ...] = ()
    expand: tuple[str, ...] = ()
    timestep: str = "timestep"
    timestep_scale: float | Callable = 1.0
    attention_kwargs: str | None = "joint_attention_kwargs"
    modes: tuple[str, ...] = ("exact", "fast")
    batched_cfg: bool = False
    check: Callable | None = None
    timestep_value: Callable | None = None
    processors: dict = dataclasses.field(default_factory=dict)
    forward_patches: tuple[ForwardPatch, ...] = ()
    method_patches: tuple[MethodPatch, ...] = ()
    guided_attention: Callable | None = None
    passes_attention_kwargs: bool = True
    modular: object = None

    def __post_init__(self) -> None:
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")

    def recommended(self, pipeline: str | None = None) -> dict:
        """The recommended settings (``NAGConfig`` field -> value) for ``pipeline`` (a class name) or the model."""
        return {**self.defaults, **self.pipelines.get(pipeline or "", {})}

    def scale_of(self, model) -> float:
        """``timestep_scale`` for ``model``."""
        return self.timestep_scale(model) if callable(self.timestep_scale) else self.timestep_scale

    def check_guided(self, model, kw: dict, batch: int) -> None:
        """Refuse a guided forward the model cannot run: the family's own ``check`` (its more specific errors first),
        then any attention module without NAG's processor (an IP-Adapter's, a custom one)."""
        from .install import check_processors

        if self.check is not None:
            self.check(model, kw, batch)
        check_processors(self, model)

    def text_len(self, text) -> int:
        return text.shape[1]

    def deliver(self, kw: dict, extra: dict, record) -> None:
        """Hand the guided forward's ``NAGForward`` record to the processors (through the attention kwargs, or per
        thread when the model does not pass those down)."""
        if not self.passes_attention_kwargs:
            call_state.set_record(record)
            if extra:
                kw[self.attention_kwargs] = extra
            return
        extra["nag"] = record
        kw[self.attention_kwargs] = extra

    def describe(self) -> str:
        return (
            f"{self.name} ({', '.join(m.__name__ for m in self.models)}): NAG acts in {self.acts_in}; "
            f"pipelines: {', '.join(self.pipelines)}"
        )
