"""The guided transformer call, for every model family: how a call says it is guided, and the record NAG passes down.

The contract (docs/spec.md, "The guided call"): a transformer forward whose text conditioning has ``2B`` rows
(the positive rows, then the NAG-negative rows) while the latents have ``B`` rows is a guided forward and returns
``B`` rows; equal batches are a plain forward. A pipeline marks its conditional call this way (``pipeline.py``
appends the NAG negative to the positive conditioning it encodes), so an unconditional call (true CFG) or any other
call keeps ``B`` text rows and runs plain. Nothing is inferred from call counts or tensor identity.

``pre_hook`` is a torch forward pre-hook (``with_kwargs=True``) that a family's patcher installs on the model. It
reads the names of the family's arguments from its ``Family`` (``family.py``), decides between a plain and a guided
forward from the batch sizes, drops the NAG-negative rows when NAG is off at this step (``nag_end``, ``nag_scale=1``),
expands the arguments the family lists to ``2B`` rows and hands a ``NAGForward`` record to the attention processors
through the family's attention-kwargs argument.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import call_state
from .config import NAGConfig

STATE_ATTR = "_nag_state"
# Keys of the model's attention kwargs that override the settings for one call (removed before the blocks see them).
CALL_KEYS = {"nag_scale": "scale", "nag_tau": "tau", "nag_alpha": "alpha", "nag_end": "end"}


@dataclasses.dataclass(frozen=True)
class NAGForward:
    """What the processors need for one guided forward: ``batch`` B (latent rows), ``text_len`` (text tokens), the
    NAG parameters and ``mode`` (``"exact"`` or ``"fast"``).

    ``pre_hook`` builds it with ``of``, which holds ``scale`` / ``tau`` / ``alpha`` as 0-dim float64 CPU tensors:
    under ``torch.compile`` (regional compilation included) a tensor is a graph input, so moving the settings between
    calls (a UI slider) never recompiles, where a float would be specialized, one graph per value with
    ``dynamic=False``. ``nag_kernels.nag`` / ``nag_merge`` take either form.
    """

    batch: int
    text_len: int
    scale: float | torch.Tensor
    tau: float | torch.Tensor
    alpha: float | torch.Tensor
    norm: str
    backend: str
    mode: str = "exact"
    guided: int | None = None  # batched CFG (families with ``batched_cfg``): only the last ``guided`` latent rows

    @classmethod
    def of(cls, batch: int, text_len: int, config: NAGConfig, guided: int | None = None) -> "NAGForward":
        scale, tau, alpha = _scalar_tensors(float(config.scale), float(config.tau), float(config.alpha))
        return cls(batch, text_len, scale, tau, alpha, config.norm, config.backend, config.mode, guided)

    @property
    def guided_rows(self) -> int:
        """How many latent rows are guided: all ``batch`` of them, or the last ``guided`` under batched CFG."""
        return self.batch if self.guided is None else self.guided


@functools.lru_cache(maxsize=256)
def _scalar_tensors(scale: float, tau: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The settings as 0-dim float64 CPU tensors, made once per distinct value (never written to: read-only inputs
    of every forward that uses them, from any thread)."""
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (scale, tau, alpha))


@dataclasses.dataclass
class NAGState:
    """What ``apply_nag`` left on a model (attribute ``_nag_state``): what was patched, and the settings of direct
    calls of the model. Nothing per call: a pipeline call's settings and a forward's record are per thread
    (``call_state``), since requests share the model."""

    family: object  # the model's Family
    config: NAGConfig  # the settings of a direct call of the model (a pipeline call brings its own)
    installed: object  # install.Installed: what to undo
    pre_hook: torch.utils.hooks.RemovableHandle | None = None
    names: tuple[str, ...] = ()  # the model's forward parameters, in order
    post_hook: torch.utils.hooks.RemovableHandle | None = None
    owners: object = None  # weakref.WeakSet of the pipelines that applied NAG to this model
    direct: bool = False  # apply_nag was called on the model itself

    @property
    def processors(self) -> dict:
        return self.installed.processors


def state_of(model: torch.nn.Module) -> NAGState | None:
    return getattr(model, STATE_ATTR, None)


def as_kwargs(names: tuple[str, ...], args, kwargs) -> dict:
    """Positional arguments by name (a plain zip: ``inspect.Signature.bind`` does not trace under torch.compile)."""
    kw = dict(zip(names, args))
    kw.update(kwargs)
    return kw


@torch.compiler.disable
def _first_value(timestep: torch.Tensor, reduce=None) -> float | None:
    """The call's timestep value (its first element, or ``reduce(timestep)``); None on meta tensors (no values)."""
    if timestep.device.type == "meta":
        return None
    return float(reduce(timestep) if reduce is not None else timestep.reshape(-1)[0])


def is_on(config: NAGConfig, timestep, timestep_scale: float, reduce=None) -> bool:
    """Whether NAG acts in this forward: ``nag_scale > 1`` and the noise level past ``nag_end``'s threshold.

    ``timestep`` is the model's timestep argument; ``timestep_scale`` is what it is multiplied by to give a scheduler
    timestep in [0, 1000] (FLUX.1 passes ``t / 1000``: 1000; models that take ``t`` itself: 1); ``reduce`` maps a
    timestep tensor to its value (default: the first element).
    """
    if config.scale <= 1:
        return False
    if config.end >= 1 or not isinstance(timestep, torch.Tensor):
        return True
    value = _first_value(timestep, reduce)
    return value is None or config.active_at(value * timestep_scale)  # meta: on (a cost upper bound)


def rows(x) -> int | None:
    """The batch of an argument: a tensor's first dim, a list's length (per-sample lists); None for anything else."""
    if isinstance(x, torch.Tensor):
        return x.shape[0] if x.dim() > 0 else None
    if isinstance(x, (list, tuple)):
        return len(x)
    return None


def doubled(name: str, x, batch: int):
    """``x`` with ``2 * batch`` rows: as is when it has them, both halves equal to it when it has ``batch``."""
    n = rows(x)
    if n is None or n == 2 * batch:
        return x
    if n != batch:
        raise ValueError(f"{name} must have batch {batch} or {2 * batch} in a NAG call, got {n}")
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) else type(x)(list(x) * 2)


def single(name: str, x, batch: int):
    """``x`` with ``batch`` rows (a forward where NAG is off), from ``batch`` or ``2 * batch``."""
    n = rows(x)
    if n is None or n == batch:
        return x
    if n != 2 * batch:
        raise ValueError(f"{name} must have batch {batch} or {2 * batch} in a NAG call, got {n}")
    return x[:batch]


def pre_hook(module, args, kwargs):
    """The forward pre-hook of a patched model (see the module docstring)."""
    state: NAGState = getattr(module, STATE_ATTR)
    family = state.family
    kw = as_kwargs(state.names, args, kwargs)
    extra_name = family.attention_kwargs
    extra = dict(kw.get(extra_name) or {}) if extra_name else {}
    overrides = {CALL_KEYS[key]: extra.pop(key) for key in list(extra) if key in CALL_KEYS}
    if extra_name and (extra_name in kw or overrides):
        kw[extra_name] = extra
    batch = rows(kw[family.latents])
    text = kw.get(family.text)
    text_rows = rows(text)
    if text_rows is None or text_rows == batch:
        return (), kw  # plain forward (a per-thread record is None: post_hook cleared it after the last forward)
    config = (call_state.call_config() or state.config).replace(**overrides)
    if family.batched_cfg and batch < text_rows < 2 * batch:
        return _batched_cfg(module, family, config, kw, extra, batch, text_rows - batch)
    if text_rows != 2 * batch:
        raise ValueError(
            f"{family.text} must have the batch of {family.latents} ({batch}, a plain forward) or twice it "
            f"({2 * batch}: positive rows, then NAG-negative rows), got {text_rows}"
        )
    for name in family.per_branch:
        if kw.get(name) is not None and rows(kw[name]) != 2 * batch:
            raise ValueError(f"{name} must have batch {2 * batch} like {family.text}, got {rows(kw[name])}")
    family.check_guided(module, kw, batch)

    on = is_on(config, kw.get(family.timestep), family.scale_of(module), family.timestep_value)
    if not on:  # a plain forward at the plain cost
        for name in (family.text, *family.per_branch, *family.expand):
            if kw.get(name) is not None:
                kw[name] = single(name, kw[name], batch)
        return (), kw
    for name in family.expand:
        if kw.get(name) is not None:
            kw[name] = doubled(name, kw[name], batch)
    record = NAGForward.of(batch, family.text_len(text), config)
    family.deliver(kw, extra, record)
    if not family.passes_attention_kwargs and getattr(module, "gradient_checkpointing", False):
        carry_record_into_checkpoints(module)
    return (), kw


CHECKPOINT_ORIGINAL = "_nag_checkpoint_original"


def _checkpoint_with_record(original):
    """diffusers' ``_gradient_checkpointing_func`` carrying the per-thread record into each checkpointed block: the
    block is called again in backward (recomputation), after this forward's record is gone, possibly on the autograd
    engine's own thread; the record is bound to the call here and set around both runs."""

    def checkpoint(block, *args):
        record = call_state.record()
        if record is None:
            return original(block, *args)

        def run(*inputs):
            before = call_state.record()
            call_state.set_record(record)
            try:
                return block(*inputs)
            finally:
                call_state.set_record(before)

        return original(run, *args)

    checkpoint.__dict__[CHECKPOINT_ORIGINAL] = original
    return checkpoint


def carry_record_into_checkpoints(module) -> None:
    """Wrap ``module``'s gradient-checkpointing function (set by diffusers' ``enable_gradient_checkpointing``, maybe
    after ``apply_nag``) once, so that recomputed blocks see the guided forward's record; ``uncarry`` undoes it."""
    original = module.__dict__.get("_gradient_checkpointing_func")
    if original is not None and CHECKPOINT_ORIGINAL not in getattr(original, "__dict__", {}):
        module.__dict__["_gradient_checkpointing_func"] = _checkpoint_with_record(original)


def uncarry(module) -> None:
    current = module.__dict__.get("_gradient_checkpointing_func")
    original = getattr(current, "__dict__", {}).get(CHECKPOINT_ORIGINAL)
    if original is not None:
        module.__dict__["_gradient_checkpointing_func"] = original


def post_hook(module, args, kwargs, output):
    """The forward hook of a model whose record travels per thread: the forward is over, its record with it."""
    call_state.set_record(None)


def _batched_cfg(module, family, config: NAGConfig, kw: dict, extra: dict, batch: int, guided: int):
    """A call whose latents hold CFG's unconditional and conditional rows together (``batch`` rows) and whose text
    holds one row per latent row followed by the NAG-negative rows of the last ``guided`` latent rows (the
    conditional ones): only those are guided; the unconditional rows run plain."""
    family.check_guided(module, kw, batch)  # e.g. a processor NAG does not wrap: refused here, not deep in diffusers
    if not is_on(config, kw.get(family.timestep), family.scale_of(module), family.timestep_value):
        for name in (family.text, *family.per_branch):  # per-text-row tensors lose the NAG-negative rows too
            if rows(kw.get(name)) == batch + guided:
                kw[name] = kw[name][:batch]
        return (), kw
    text = kw[family.text]
    record = NAGForward.of(batch, family.text_len(text), config, guided)
    family.deliver(kw, extra, record)
    if not family.passes_attention_kwargs and getattr(module, "gradient_checkpointing", False):
        carry_record_into_checkpoints(module)
    return (), kw
