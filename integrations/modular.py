"""NAG on diffusers' modular pipelines (``ModularPipeline`` built from blocks), on the existing core.

A modular pipeline is a tree of blocks run over a per-call ``PipelineState``; its denoise loop calls the transformer
once per guidance batch of its guider (or once per step for blocks without a guider). NAG needs three things there,
the same three ``pipeline.py`` gives a classic pipeline:

1. **Inputs.** A modular pipeline takes only the inputs its blocks declare. ``NAGTextEncoderStep``, inserted after
   the family's text-encoder step, declares ``nag_negative_prompt`` (``_2`` / ``_3`` where the family's text-encoder
   block takes ``prompt_2`` / ``prompt_3``), the pre-encoded ``nag_negative_*`` embeds of the family (its
   ``PromptAdapter``'s names) and ``nag_scale`` / ``nag_tau`` / ``nag_alpha`` / ``nag_end``.
2. **The NAG negative, encoded by the family's own text-encoder block**: the step runs that block once more on a copy
   of the call's state whose prompt is the NAG negative (one string per prompt), without unconditional embeddings,
   and keeps its embeddings. It writes the call's ``NAGCall`` record (settings, the negative's rows) into the
   ``PipelineState`` as ``nag_guidance``.
3. **The guided call.** ``apply_nag`` wraps each loop sub-block that calls the guided model (the "denoiser" of every
   denoise loop) in ``NAGLoopDenoiser``: for the duration of that sub-block it replaces the positive text
   conditioning in the loop's block state (``prompt_embeds`` ... , ``B`` rows) by the positive rows followed by the
   NAG negative's rows (``2B``), and runs it under ``call_state.pipeline_call(config)``. A guider builds its
   conditional batch from the positive conditioning, so its conditional transformer call carries ``2B`` text rows for
   ``B`` latents: the guided forward of the transformer contract (``guided.py``); its unconditional batch is built
   from the negative conditioning and stays plain. Blocks without a guider pass the positive conditioning straight
   to the transformer: guided too. Every guider and its settings are untouched.

``apply_nag`` replaces the pipeline's blocks by a patched deep copy (the original object is kept and put back by
``remove_nag``), patches the guided models as for a classic pipeline, and keeps its settings in the pipeline's
``__dict__``. Per-call values live in the call's ``PipelineState`` (the ``NAGCall`` record) and, for the duration of
one denoiser step, in ``call_state`` (per thread): never on a shared module, block or guider.

``NAGGuidance`` (``guider.py``) is the other way in, for users who compose blocks themselves: it adds the NAG rows to
its own conditional batch. It finds the call's ``NAGCall`` through ``call_state``: ``NAGTextEncoderStep`` leaves it
there as the call's pending record, and the guider takes it at the first step of its denoise loop (``take_pending``).

Per-family knowledge is the family's own declaration, ``Family.modular`` (a ``modular_spec.ModularSpec``): where the
text-encoder step is, the state names of the positive's per-branch tensors and the guider-input keys the family's
denoise blocks use for them. ``SPECS`` (by family name) declares modular blocks for a family from outside its module.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from diffusers.modular_pipelines import ModularPipeline, ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline import LoopSequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

from . import call_state
from .config import NAGConfig
from .guided import rows, state_of
from .modular_spec import ModularSpec, join_lists  # noqa: F401  (ModularSpec re-exported)
from .pipeline import JOINED as _JOINED
from .pipeline import PIPELINE_CONFIG, SETTINGS, _broadcast, per_prompt
from .registry import family_for

ORIGINAL_BLOCKS = "_nag_original_blocks"  # a patched modular pipeline's own blocks, in its __dict__
STEP_NAME = "nag_text_encoder"
RECORD = "nag_guidance"  # the PipelineState entry holding the call's NAGCall
_PENDING = "modular_nag_pending"  # call_state slots (per thread)
_ACTIVE = "modular_nag_active"
NO_NAG = "off"  # the pending record of a call in which NAG does not act


SPECS: dict[str, ModularSpec] = {}  # by ``Family.name``: declarations for families that do not declare their own


def declared(family) -> ModularSpec | None:
    """The family's modular declaration (``SPECS`` first, then ``Family.modular``), or ``None``."""
    return SPECS.get(family.name) or getattr(family, "modular", None)


def family_named(model_name: str | None):
    """The registered family whose modular blocks have ``model_name`` (``None`` if none)."""
    from .registry import families

    for family in families():
        spec = declared(family)
        if spec is not None and model_name in spec.model_names:
            return family
    return None


def is_modular(obj) -> bool:
    return isinstance(obj, ModularPipeline)


def _prompt_count(prompt, positive) -> int:
    """How many prompts the call has: from the call's ``prompt`` (a string or a list) where it gave one, else the
    rows of its pre-encoded conditioning (a text-encoder step may already have repeated the rows per image)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt:
        return len(prompt)
    return rows(positive)


def spec_for(family) -> ModularSpec:
    spec = declared(family)
    if spec is None:
        from .registry import families

        names = sorted(f.name for f in families() if declared(f) is not None)
        raise TypeError(f"NAG does not support {family.name}'s modular blocks yet; modular families: {', '.join(names)}")
    return spec


# --------------------------------------------------------------------------------------------------------------------
# The per-call record


@dataclasses.dataclass(eq=False)
class NAGCall:
    """One modular pipeline call's NAG: its settings and the NAG negative's rows (one per prompt, one, or one per
    image), to be joined to the positive conditioning of the denoise loop (``B`` rows). Lives in the call's
    ``PipelineState`` (``nag_guidance``)."""

    family: object
    spec: ModularSpec
    config: NAGConfig
    prompts: int  # rows of the positive conditioning as encoded (before num_images_per_prompt)
    negative: dict  # state name -> the NAG negative's tensor (or list, Z-Image)
    names: dict  # state name -> the NAG argument it came from (for errors)
    _cache: tuple = dataclasses.field(default=(None, None), repr=False)

    @property
    def per_branch(self) -> tuple[str, ...]:
        """The state names of the positive's per-branch tensors (they get the NAG negative's rows)."""
        if self.spec.per_branch:
            return tuple(self.spec.per_branch)
        return tuple(self.spec.outputs[index] for index in self.family.prompts.per_branch)

    def join(self, positive: dict) -> dict:
        """``positive`` (state name -> tensor with ``B`` rows) with the NAG negative's rows appended: ``2B`` rows,
        positive first. Cached for the same positive tensors (every step of a loop reuses them)."""
        key = tuple(id(positive.get(name)) for name in self.per_branch)
        if self._cache[0] == key:
            return self._cache[1]
        first = positive[self.per_branch[0]]
        images = rows(first)
        if images is None or images % self.prompts:
            raise ValueError(
                f"the prompt's conditioning has {images} rows, not a multiple of the {self.prompts} encoded prompts"
            )
        per_image = images // self.prompts
        if self.spec.join is not None:
            negative = {name: self._rows(name, images, per_image) for name in self.per_branch}
            joined = self.spec.join({name: positive[name] for name in self.per_branch}, negative)
        else:
            adapter = self.family.prompts
            index_of = {name: index for index, name in self.spec.outputs.items()}
            result = [None] * (max(self.spec.outputs) + 1)
            for name in self.per_branch:
                result[index_of[name]] = positive.get(name)
            negative = {index_of[name]: self._rows(name, images, per_image) for name in self.per_branch}
            out = adapter.append(tuple(result), negative)
            joined = {name: out[index_of[name]] for name in self.per_branch}
        self._cache = (key, joined)
        return joined

    def _rows(self, name: str, images: int, per_image: int):
        """The NAG negative's ``name`` with one row per image (``images``, ``per_image`` per prompt)."""
        x = self.negative.get(name)
        label = self.names.get(name, name)
        if x is None:
            return None
        if self.spec.join is None:
            return _broadcast(label, x, images, per_image)
        items = list(x) if isinstance(x, (list, tuple)) else [x]  # per-sample lists (Z-Image): [L, D] tensors
        prompts = images // per_image
        if len(items) == images:
            return items
        if len(items) == 1:
            return items * images
        if len(items) == prompts:
            return [item for item in items for _ in range(per_image)]
        raise ValueError(f"{label} must have 1 or {prompts} entries, got {len(items)}")


def take_pending():
    """The ``NAGCall`` a ``NAGTextEncoderStep`` left for the next denoise loop on this thread (``None`` if none),
    removing it: each record serves exactly one loop."""
    return call_state.take(_PENDING)


def active_call():
    """The ``NAGCall`` of the denoise loop in progress on this thread, as taken by ``NAGGuidance`` at its first
    step."""
    return call_state.peek(_ACTIVE)


def set_active(call) -> None:
    call_state.put(_ACTIVE, call)


def joined_here() -> bool:
    """Whether the denoiser step in progress on this thread already carries the NAG rows (``apply_nag``'s blocks)."""
    return bool(call_state.peek(_JOINED))


# --------------------------------------------------------------------------------------------------------------------
# Blocks


class _Components:
    """The pipeline as a text-encoder block sees it when it encodes the NAG negative: the same components, without
    unconditional embeddings (or with them where ``unconditional``: Wan). Nothing is written to the pipeline."""

    def __init__(self, pipe, unconditional: bool):
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "requires_unconditional_embeds", unconditional)
        object.__setattr__(self, "guider", _Guider(unconditional))

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)


class _Guider:
    """What a text-encoder block reads of a guider: whether unconditional embeddings are needed."""

    def __init__(self, unconditional: bool):
        self._enabled = unconditional
        self.num_conditions = 2 if unconditional else 1


def _family_of(components):
    for attr in ("transformer", "unet", "transformer_2"):
        model = getattr(components, attr, None)
        if isinstance(model, torch.nn.Module):
            return family_for(getattr(model, "_orig_mod", model))
    raise ValueError(
        f"{type(components).__name__} has no transformer loaded; NAG needs the denoiser model to know the family "
        "(load_components / update_components first)"
    )


def _base_config(components, family) -> tuple[NAGConfig, bool]:
    """The settings a call starts from, and whether a NAG guider asks for NAG on every call: ``apply_nag``'s
    settings on this pipeline, else a ``NAGGuidance`` guider's, else the family's recommended ones."""
    from .guider import NAGGuidance

    own = getattr(components, "__dict__", {}).get(PIPELINE_CONFIG)
    guider = getattr(components, "guider", None)
    nag_guider = isinstance(guider, NAGGuidance) and guider._enabled
    if own is not None:
        return own, nag_guider
    if isinstance(guider, NAGGuidance):
        return guider.nag_config(family), nag_guider
    return NAGConfig(**family.recommended(None)), False


class NAGTextEncoderStep(ModularPipelineBlocks):
    """The NAG text-encoder step: declares the NAG inputs and encodes the NAG negative with the family's own
    text-encoder block (``text_encoder``, the block that encodes the prompt; insert this step right after it).

    Inputs: ``nag_negative_prompt`` (and ``nag_negative_prompt_2`` / ``_3`` where the text-encoder block takes
    ``prompt_2`` / ``prompt_3``), the family's pre-encoded ``nag_negative_*`` embeddings, ``nag_scale``,
    ``nag_tau``, ``nag_alpha``, ``nag_end``. Output: ``nag_guidance``, the call's ``NAGCall`` (``None`` when NAG
    does not act in the call), also left for a ``NAGGuidance`` guider on this thread.

    NAG acts when a NAG negative or ``nag_scale`` is given and ``nag_scale > 1`` (as on classic pipelines), or on
    every call when the pipeline's guider is an enabled ``NAGGuidance`` with ``nag_scale > 1`` (the negative then
    defaults to the empty string).

    Example (blocks composed by hand, with a NAG guider)::

        >>> blocks = QwenImageAutoBlocks()
        >>> blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
        >>> pipe = blocks.init_pipeline("Qwen/Qwen-Image")
        >>> pipe.load_components(torch_dtype=torch.bfloat16)
        >>> pipe.update_components(guider=NAGGuidance(guidance_scale=4.0, nag_scale=5.0))
        >>> image = pipe(prompt="a cat", nag_negative_prompt="blurry", output="images")[0]
    """

    model_name = None

    def __init__(self, text_encoder: ModularPipelineBlocks, family=None):
        super().__init__()
        self.text_encoder = text_encoder
        self.family = family or family_named(getattr(text_encoder, "model_name", None))
        self.model_name = getattr(text_encoder, "model_name", None)

    @property
    def description(self) -> str:
        return (
            "NAG text-encoder step (nag-kernels): encodes nag_negative_prompt with "
            f"{type(self.text_encoder).__name__} for Normalized Attention Guidance"
        )

    @property
    def expected_components(self):
        return self.text_encoder.expected_components

    @property
    def expected_configs(self):
        return self.text_encoder.expected_configs

    def _prompt_names(self) -> dict:
        """NAG prompt argument -> the text-encoder block's input, for the inputs the block takes."""
        taken = {param.name for param in self.text_encoder.inputs}
        names = {"nag_negative_prompt": "prompt"}
        if self.family is not None:
            names = dict(self.family.prompts.prompts)
        return {name: target for name, target in names.items() if target in taken or target == "prompt"}

    def _embed_names(self) -> dict:
        """NAG embeddings argument -> the state name of the positive's tensor it pairs with."""
        if self.family is None:  # unknown until the call (composed by hand): the first family's names
            return {"nag_negative_prompt_embeds": "prompt_embeds"}
        spec = spec_for(self.family)
        return {name: spec.outputs[index] for name, index in self.family.prompts.embeds.items()}

    @property
    def inputs(self) -> list[InputParam]:
        params = [InputParam(name, description="NAG negative prompt (nag-kernels)") for name in self._prompt_names()]
        params += [InputParam(name, description="pre-encoded NAG negative (nag-kernels)")
                   for name in self._embed_names()]
        params += [InputParam(name, description="NAG setting for this call (nag-kernels)") for name in SETTINGS]
        return params

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam(RECORD, description="the call's NAG record (nag-kernels), read by the denoise step")]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        call_state.put(_PENDING, None)
        call_state.put(_ACTIVE, None)
        call = self._record(components, state)
        state.set(RECORD, call)
        call_state.put(_PENDING, call if call is not None else NO_NAG)  # NO_NAG: the step ran, NAG is off
        return components, state

    def _record(self, components, state: PipelineState):
        family = self.family or _family_of(components)
        spec = spec_for(family)
        adapter = family.prompts
        base, always = _base_config(components, family)
        values = {name: state.get(name) for name in SETTINGS}
        config = base.replace(**{name[len("nag_"):]: value for name, value in values.items()})
        negatives = {name: state.get(name) for name in adapter.names}
        check_values = getattr(adapter, "check_values", None)
        if check_values is not None:
            check_values(negatives)
        adapter.check(negatives)
        given = any(value is not None for value in negatives.values()) or values["nag_scale"] is not None
        if config.scale <= 1 or not (given or always):
            return None
        embed_state = {name: spec.outputs[index] for name, index in adapter.embeds.items()}
        first = spec.per_branch[0] if spec.per_branch else spec.outputs[adapter.per_branch[0]]
        positive = state.get(first)
        if positive is None:
            raise ValueError(
                f"the NAG text-encoder step found no {first} in the pipeline state: insert it after the step that "
                "encodes the prompt"
            )
        prompts = _prompt_count(state.get("prompt"), positive)
        if any(negatives.get(name) is not None for name in adapter.embeds):
            negative = {embed_state[name]: negatives[name] for name in adapter.embeds}
        else:
            negative = self._encode(components, state, family, spec, negatives, prompts)
        names = {state_name: name for name, state_name in embed_state.items()}
        return NAGCall(family, spec, config, prompts, negative, names)

    def _encode(self, components, state, family, spec, negatives: dict, prompts: int) -> dict:
        """The NAG negative encoded by the family's text-encoder block, on a copy of the call's state."""
        adapter = family.prompts
        sub = PipelineState(
            values=dict(state.values), kwargs_mapping={key: list(value) for key, value in state.kwargs_mapping.items()}
        )
        for param in self.text_encoder.inputs:  # no positive or CFG-negative text or embeddings of the call's own
            name = param.name or ""
            if name.startswith(("negative_", "prompt")) or name in spec.outputs.values():
                sub.values[name] = None
        for name in (*spec.outputs.values(), *spec.per_branch):
            sub.values[name] = None
        for index, (name, target) in enumerate(self._prompt_names().items()):
            default = "" if index == 0 else None
            value = per_prompt(name, negatives.get(name) or default, prompts)
            # One prompt: the string itself (FLUX.3's text-encoder steps take one str per call; the others wrap it)
            sub.values[target] = value[0] if isinstance(value, list) and prompts == 1 else value
        unconditional = spec.unconditional
        self.text_encoder(_Components(components, unconditional), sub)
        names = spec.per_branch or tuple(spec.outputs[index] for index in adapter.per_branch)
        encoded = {name: sub.get(name) for name in (*spec.outputs.values(), *names)}
        for name in names:
            if encoded[name] is None:
                raise RuntimeError(
                    f"{type(self.text_encoder).__name__} did not encode the NAG negative ({name} missing); is it the "
                    "step that encodes the prompt?"
                )
        return encoded


class NAGLoopDenoiser(ModularPipelineBlocks):
    """A loop sub-block that calls the guided model, with the NAG negative's rows joined to the positive
    conditioning for the duration of its call (module docstring, 3). Everything else is the wrapped block's."""

    def __init__(self, denoiser: ModularPipelineBlocks):
        super().__init__()
        self.denoiser = denoiser
        self.model_name = getattr(denoiser, "model_name", None)

    @property
    def description(self) -> str:
        return f"{self.denoiser.description}\n(with Normalized Attention Guidance, nag-kernels)"

    @property
    def expected_components(self):
        return self.denoiser.expected_components

    @property
    def expected_configs(self):
        return self.denoiser.expected_configs

    @property
    def inputs(self):
        return [*self.denoiser.inputs, InputParam(RECORD, description="the call's NAG record (nag-kernels)")]

    @property
    def intermediate_outputs(self):
        return self.denoiser.intermediate_outputs

    def __call__(self, components, block_state, **kwargs):
        call = getattr(block_state, RECORD, None)
        if call is None:
            return self.denoiser(components, block_state, **kwargs)
        _check_patched(components, call.family)
        positive = {name: getattr(block_state, name, None) for name in call.per_branch}
        if positive[call.per_branch[0]] is None:
            raise ValueError(f"NAG found no {call.per_branch[0]} in the denoise step's inputs")
        joined = call.join(positive)
        # The same tensors where the block state also holds them in a dict (a kwargs_type such as
        # denoiser_input_fields, from which FLUX.3's loop denoisers read the text)
        holders = [value for value in vars(block_state).values() if isinstance(value, dict)]
        swapped = [(holder, name) for holder in holders for name in joined
                   if name in holder and holder[name] is positive[name]]
        t = kwargs.get("t")
        if call.spec.step_rows and isinstance(t, torch.Tensor) and t.numel() == 1:
            kwargs["t"] = t.reshape(1).expand(rows(positive[call.per_branch[0]]))
        before = call_state.peek(_JOINED)
        try:
            for name, value in joined.items():
                setattr(block_state, name, value)
            for holder, name in swapped:
                holder[name] = joined[name]
            call_state.put(_JOINED, True)
            with call_state.pipeline_call(call.config):
                return self.denoiser(components, block_state, **kwargs)
        finally:
            call_state.put(_JOINED, before)
            for name, value in positive.items():
                setattr(block_state, name, value)
            for holder, name in swapped:
                holder[name] = positive[name]


class _WithUnconditional(ModularPipelineBlocks):
    """A text-encoder step run as if the guider needed unconditional embeddings (``ModularSpec.unconditional``): on
    diffusers 0.42.1 the Wan and LTX-Video denoise steps require the negative embeddings (and ``WanTextEncoderStep``
    fails without them), so their stock modular pipelines cannot run with CFG off; NAG with CFG off (distilled Wan)
    needs them to. With CFG off the guider leaves them unused."""

    def __init__(self, block: ModularPipelineBlocks):
        super().__init__()
        self.block = block
        self.model_name = getattr(block, "model_name", None)

    description = property(lambda self: self.block.description)
    expected_components = property(lambda self: self.block.expected_components)
    expected_configs = property(lambda self: self.block.expected_configs)
    inputs = property(lambda self: self.block.inputs)
    intermediate_outputs = property(lambda self: self.block.intermediate_outputs)

    def __call__(self, components, state):
        if getattr(components, "requires_unconditional_embeds", True):
            return self.block(components, state)
        self.block(_Components(components, True), state)
        return components, state


def _check_patched(components, family) -> None:
    for attr in family.guided_models:
        model = getattr(components, attr, None)
        if isinstance(model, torch.nn.Module) and state_of(getattr(model, "_orig_mod", model)) is None:
            raise RuntimeError(
                f"{type(components).__name__}.{attr} is not patched for NAG (it was replaced or passed to remove_nag "
                "after apply_nag(pipe)); call nag_kernels.integrations.apply_nag(pipe) again"
            )


def _wrap_denoisers(blocks, models: tuple[str, ...]) -> int:
    """Wrap every loop sub-block of ``blocks`` that calls one of ``models`` (the denoiser of each loop; a loop's
    ``before_*`` / ``after_*`` sub-blocks that only read the model's config are left alone). Returns how many."""
    count = 0
    for block in (blocks.sub_blocks or {}).values():
        if isinstance(block, LoopSequentialPipelineBlocks):
            for name, sub in list(block.sub_blocks.items()):
                uses = {spec.name for spec in sub.expected_components} & set(models)
                if uses and not name.startswith(("before", "after")) and not isinstance(sub, NAGLoopDenoiser):
                    block.sub_blocks[name] = NAGLoopDenoiser(sub)
                    count += 1
        else:
            count += _wrap_denoisers(block, models)
    return count


def patch_blocks(blocks: ModularPipelineBlocks, family, spec: ModularSpec) -> ModularPipelineBlocks:
    """A copy of ``blocks`` with NAG: the NAG text-encoder step after the family's text-encoder step, and every
    loop denoiser wrapped. ``blocks`` itself is unchanged."""
    name = type(blocks).__name__
    top = blocks.sub_blocks
    if spec.text_encoder not in (top or {}):
        raise TypeError(
            f"NAG cannot patch {name}: it has no {spec.text_encoder!r} step to encode the NAG negative with (NAG "
            f"supports the {family.name} blocks that encode the prompt)"
        )
    patched = copy.deepcopy(blocks)
    if spec.blocks is not None:
        spec.blocks(patched)
    top = patched.sub_blocks
    text = top[spec.text_encoder]
    if spec.unconditional:
        text = top[spec.text_encoder] = _WithUnconditional(text)
    index = list(top).index(spec.text_encoder)
    top.insert(STEP_NAME, NAGTextEncoderStep(text, family), index + 1)
    if not _wrap_denoisers(patched, family.guided_models):
        raise TypeError(f"NAG cannot patch {name}: no denoise loop calls {' / '.join(family.guided_models)}")
    return patched


# --------------------------------------------------------------------------------------------------------------------
# apply / remove


def _guided_models(pipe, family) -> list:
    return [(attr, getattr(pipe, attr, None)) for attr in family.guided_models if getattr(pipe, attr, None) is not None]


def apply(pipe, given: dict):
    """``apply_nag`` on a ``ModularPipeline`` (``api.apply_nag``'s dispatch)."""
    from .api import _apply_model, _check_not_compiled, _roll_back, _settings, _snapshot

    name = type(pipe).__name__
    family = _family_of(pipe)
    spec = spec_for(family)
    original = pipe.__dict__.get(ORIGINAL_BLOCKS)
    blocks = original if original is not None else pipe._blocks
    config = _settings(family, spec.pipelines.get(type(blocks).__name__), given)
    models = _guided_models(pipe, family)
    for attr, model in models:
        _check_not_compiled(model, f"{name}.{attr}")
        if family_for(model) is not family:
            raise TypeError(f"{name}.{attr} is a {type(model).__name__}, which {family.name}'s NAG does not patch")
    patched = pipe._blocks if original is not None else patch_blocks(blocks, family, spec)
    before = [(model, _snapshot(model)) for _, model in models]
    try:  # all or nothing
        for attr, model in models:
            _apply_model(model, config, f"{name}.{attr}", owner=pipe)
    except BaseException:
        for model, snapshot in before:
            _roll_back(model, snapshot, pipe)
        raise
    if original is None:
        pipe.__dict__[ORIGINAL_BLOCKS] = blocks
        pipe._blocks = patched
    pipe.__dict__[PIPELINE_CONFIG] = config
    return pipe


def is_patched(pipe) -> bool:
    return ORIGINAL_BLOCKS in pipe.__dict__


def remove(pipe):
    """``remove_nag`` on a ``ModularPipeline``: its own blocks back, the models released (unpatched unless another
    owner still needs them), also from a ``NAGGuidance`` guider that patched them."""
    from .api import _release_model
    from .guider import NAGGuidance

    original = pipe.__dict__.pop(ORIGINAL_BLOCKS, None)
    if original is not None:
        pipe._blocks = original
    pipe.__dict__.pop(PIPELINE_CONFIG, None)
    guider = pipe.__dict__.get("guider")
    for attr in ("transformer", "transformer_2", "unet"):
        model = getattr(pipe, attr, None)
        if isinstance(model, torch.nn.Module):
            _release_model(model, pipe)
            if isinstance(guider, NAGGuidance):
                _release_model(model, guider)
    return pipe


def own_config(pipe):
    return pipe.__dict__.get(PIPELINE_CONFIG) if is_patched(pipe) else None


def restore_config(pipe, config) -> None:
    pipe.__dict__[PIPELINE_CONFIG] = config


def warn_no_record(guider) -> None:
    warnings.warn(
        f"{type(guider).__name__} found no NAG negative for this denoise loop: the pipeline's blocks have no "
        "NAGTextEncoderStep (nag_kernels.integrations.modular) after their text-encoder step, so this loop runs "
        "without NAG (CFG only)",
        stacklevel=3,
    )
