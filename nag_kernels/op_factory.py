"""One declaration per NAG op; its registered ``torch.library`` ops, fake impls, autograd and dispatcher are generated.

An op is declared once, as an ``OpSpec``: its tensor arguments, its NAG scalars (``scale``, ``tau``, ``alpha``, or a
subset), a metadata check, the shape of its result, its PyTorch and Triton implementations, its backward formula, and
whether it takes ``out=``. ``define(spec)`` registers, for ``name = spec.name``::

    nag_kernels::<name>(Tensor <tensors>..., float <scalars>..., str norm="l1", str backend="auto") -> Tensor
    nag_kernels::<name>_out(Tensor(a!) out, <same>) -> ()
    nag_kernels::<name>_scalar_tensors(Tensor <tensors>..., Tensor <scalars>..., str norm, str backend) -> Tensor
    nag_kernels::<name>_out_scalar_tensors(Tensor(a!) out, <same>) -> ()

(the ``_out`` pair only for an op with ``out=``), each with a fake implementation (meta and fake tensors,
``torch.compile(fullgraph=True)``; Inductor sees an opaque call), the autograd formula on the two non-mutating ones
(mutating ops have none: ``out=`` is inference-only), and returns an ``Op``: called as
``op(tensors, scalars, norm=, out=, backend=)`` it is the dispatcher behind the public function, which
``Op.public`` declares and checks against the spec (so the public signatures cannot drift apart).

The dispatcher:

- eager, plain tensors (``direct_call_ok``): validates, resolves the backend and runs the implementation directly,
  skipping the dispatcher's tens of microseconds of host time per call;
- tensor subclasses, meta tensors, dispatch modes, autograd: the float-scalar op (``<name>`` or ``<name>_out``);
- while ``torch.compile`` traces: the ``_scalar_tensors`` ops with the scalars as 0-dim float64 CPU tensors
  (``checks.as_scalar_tensor``), so that changing scale/tau/alpha between calls does not compile a graph per value;
  their values are read with ``.item()`` and checked when the op runs.

Every path ends in ``Op.run`` (the ops' real implementation): all checks with the concrete values, the backend
resolved (``validate_backend``), and, for ``out=``, the overlap rule: ``out`` may be exactly one of the inputs (the
same view: in place); an ``out`` that overlaps an input any other way (shifted by a token, over ``norms``) is computed
into a temporary and copied, on every backend; an ``out`` whose own elements overlap (a stride-0 ``expand()``) is
refused by ``checks.check_out``.

Backends: ``"triton"`` (CUDA/ROCm tensors, or CPU under ``TRITON_INTERPRET=1``; float32, float16, bfloat16),
``"torch"`` (PyTorch ops on any device and float dtype), ``"auto"`` (Triton where it runs and the dtype is one it
takes, PyTorch elsewhere: float64 always runs on PyTorch).

Not ``torch.library.triton_op``: it fails under the Triton interpreter, where the tests run; ``custom_op`` with a fake
implementation traces the same way, opaque to Inductor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .checks import (
    as_number,
    as_scalar_tensor,
    check_backend,
    check_norm,
    check_out,
    check_scalar_tensor,
    check_scalars,
    overlaps_other_than_alias,
)
from .compute import records_grad

NAMESPACE = "nag_kernels"
# The defaults of the scalars after ``scale`` (which has none), and of the string arguments.
SCALAR_DEFAULTS = {"tau": 2.5, "alpha": 0.25}
STRING_DEFAULTS = {"norm": "l1", "backend": "auto"}


# ----------------------------------------------------------------------------------------------------------------
# Backend choice


@functools.cache
def triton_available() -> bool:
    """Whether triton imports; asked once per process (every call resolves its backend, and a failing import on a
    machine without triton is a slow search of the import path each time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` here (GPU, or CPU under the Triton interpreter)."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` or ``"torch"`` for ``device``; refuse ``"triton"`` where it cannot run."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    if backend == "triton" and not triton_runs_on(device):
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton (or use backend='torch')")
        raise ValueError(
            f"backend='triton' runs on CUDA/ROCm tensors (or CPU with TRITON_INTERPRET=1), got a tensor on {device}; "
            "use backend='auto' or 'torch'"
        )
    return backend


def validate_backend(name: str, tensor: torch.Tensor, backend: str) -> str:
    """``resolve_backend`` for ``tensor``'s device and dtype: ``"auto"`` takes PyTorch for float64 (argument ``name``),
    which the Triton kernels have no path for, and an explicit ``"triton"`` refuses it."""
    check_backend(backend)
    if backend == "auto" and tensor.dtype == torch.float64:
        return "torch"
    backend = resolve_backend(backend, tensor.device)
    if backend == "triton" and tensor.dtype == torch.float64:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='triton', got torch.float64")
    return backend


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call may skip the ``torch.library`` dispatcher and run the implementation directly.

    The dispatcher costs tens of microseconds of host time per call, which dominates at Flux sizes when the GPU is
    not ahead of the host: on an H200 a 27 us kernel took 157 us per call through the op, and a call that skips it
    costs 47 us of host time (docs/performance.md, "The combine kernel").
    The op is needed only where something must see it: ``torch.compile`` tracing, tensor subclasses (fake/functional
    tensors), meta tensors, an active ``TorchDispatchMode`` (e.g. ``FlopCounterMode``), and autograd (an input that
    requires grad while grad mode is on: the op carries the backward formula). Plain eager calls on real tensors
    compute the same thing either way.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.device.type == "meta" or (grad and t.requires_grad):
            return False
    return True


def refuse_grad_in_place(fn_name: str, *tensors: torch.Tensor | None) -> None:
    """``out=`` runs an in-place op, which has no autograd formula: refuse it where a gradient would be needed rather
    than return a result silently cut from the graph."""
    if records_grad(*tensors):
        raise RuntimeError(
            f"{fn_name}(..., out=...) writes in place and is inference-only, but an input requires grad: "
            f"call {fn_name} without out= (differentiable), or under torch.no_grad()"
        )


def read_scalars(*scalars: torch.Tensor) -> tuple[float, ...]:
    """The values of 0-dim scalar tensors (CPU ones: no device sync)."""
    return tuple(t.item() for t in scalars)


# ----------------------------------------------------------------------------------------------------------------
# The declaration


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One NAG op, declared once.

    Attributes:
        name: the op's name under ``nag_kernels::`` and its public function's name.
        tensors: the tensor arguments, in order.
        scalars: the NAG scalars it takes, in order: ``("scale", "tau", "alpha")`` or a prefix of it.
        main: the tensor whose device and dtype choose the backend, and whose shape, dtype and device ``out`` has.
        check: ``check(*tensors)``: device-independent metadata checks (run on fake tensors too) that name the
            argument at fault.
        new_result: ``new_result(*tensors)``: an empty result (the fake implementation's output).
        torch_impl, triton_impl: ``impl(*tensors, *scalars, norm[, out=out])`` on validated inputs, scalars as Python
            numbers; ``out`` only when ``has_out``, and never overlapping an input other than as the same view.
            The Triton one imports Triton when called, so that the package imports without it.
        backward: ``backward(grad, *tensors, *scalars, norm)``: one gradient per tensor (float32, or float64 for
            float64 inputs; cast by the caller), the scalars numbers or 0-dim tensors. ``None``: not differentiable.
        has_out: whether the op takes ``out=`` (and has the ``_out`` variants).
        example: ``example()``: small valid CPU float32 tensors, for the opcheck test that covers every op.
    """

    name: str
    tensors: tuple[str, ...]
    scalars: tuple[str, ...]
    main: str
    check: Callable[..., None]
    new_result: Callable[..., torch.Tensor]
    torch_impl: Callable[..., torch.Tensor]
    triton_impl: Callable[..., torch.Tensor]
    backward: Callable[..., tuple] | None
    has_out: bool
    example: Callable[[], tuple]


REGISTRY: dict[str, Op] = {}


def define(spec: OpSpec) -> Op:
    """Register ``spec``'s ops (see the module docstring) and return its dispatcher."""
    if spec.name in REGISTRY:
        raise RuntimeError(f"op {spec.name!r} is defined twice")
    op = Op(spec)
    REGISTRY[spec.name] = op
    return op


def _schema(spec: OpSpec, out: bool, scalar_tensors: bool) -> str:
    args = ["Tensor(a0!) out"] if out else []
    args += [f"Tensor {name}" for name in spec.tensors]
    args += [f"{'Tensor' if scalar_tensors else 'float'} {name}" for name in spec.scalars]
    # The float ops take ComfyUI-NAG's order (z_pos, z_neg, scale, tau, alpha) and default norm and backend; the
    # scalar-tensor twins are called by the dispatcher only, with every argument.
    args += [f'str {k}="{v}"' if not scalar_tensors else f"str {k}" for k, v in STRING_DEFAULTS.items()]
    return f"({', '.join(args)}) -> {'()' if out else 'Tensor'}"


class Op:
    """The registered variants of one ``OpSpec`` (``variants``: op name -> ``CustomOpDef``) and its dispatcher."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.n_tensors, self.n_scalars = len(spec.tensors), len(spec.scalars)
        self.main_index = spec.tensors.index(spec.main)
        self.variants: dict[str, torch._library.custom_ops.CustomOpDef] = {}
        self.public_function: Callable | None = None  # set by ``public``
        for out in (False, True) if spec.has_out else (False,):
            for scalar_tensors in (False, True):
                self._register(out, scalar_tensors)
        ops = getattr(torch.ops, NAMESPACE)
        suffix = "_scalar_tensors"
        self._op = getattr(ops, spec.name).default
        self._op_st = getattr(ops, spec.name + suffix).default
        self._op_out = getattr(ops, spec.name + "_out").default if spec.has_out else None
        self._op_out_st = getattr(ops, spec.name + "_out" + suffix).default if spec.has_out else None

    # -- registration ---------------------------------------------------------------------------------------------

    def _split(self, args: tuple, out: bool):
        """``(out, tensors, scalars, norm, backend)`` of a registered op's arguments; the dispatcher leaves out the
        string arguments that were not given, so their defaults are filled in here."""
        n_required = out + self.n_tensors + self.n_scalars
        args = (*args, *tuple(STRING_DEFAULTS.values())[len(args) - n_required:])
        o, rest = (args[0], args[1:]) if out else (None, args)
        tensors, scalars = rest[: self.n_tensors], rest[self.n_tensors: self.n_tensors + self.n_scalars]
        norm, backend = rest[self.n_tensors + self.n_scalars:]
        return o, tensors, scalars, norm, backend

    def _register(self, out: bool, scalar_tensors: bool) -> None:
        spec = self.spec
        name = spec.name + ("_out" if out else "") + ("_scalar_tensors" if scalar_tensors else "")

        def impl(*args):
            o, tensors, scalars, norm, backend = self._split(args, out)
            if scalar_tensors:
                scalars = tuple(as_number(n, v) for n, v in zip(spec.scalars, scalars))
            result = self.run(tensors, scalars, norm, backend, o)
            return None if out else result

        def fake(*args):
            o, tensors, scalars, norm, backend = self._split(args, out)
            self.check_metadata(tensors, norm, backend, o)
            if scalar_tensors:
                for n, v in zip(spec.scalars, scalars):
                    check_scalar_tensor(n, v)
            else:
                check_scalars(spec.scalars, scalars)
            return None if out else spec.new_result(*tensors)

        impl.__name__ = fake.__name__ = name
        op = torch.library.custom_op(
            f"{NAMESPACE}::{name}", impl, mutates_args=("out",) if out else (), schema=_schema(spec, out, scalar_tensors)
        )
        op.register_fake(fake)
        if not out and spec.backward is not None:
            op.register_autograd(self._backward, setup_context=self._setup_context)
        self.variants[name] = op

    def _setup_context(self, ctx, inputs, output) -> None:
        n = self.n_tensors
        ctx.save_for_backward(*inputs[:n])
        ctx.params = (*inputs[n: n + self.n_scalars], inputs[n + self.n_scalars])  # scalars (numbers or 0-dim), norm

    def _backward(self, ctx, grad):
        tensors = ctx.saved_tensors
        grads = self.spec.backward(grad, *tensors, *ctx.params)
        wanted = ctx.needs_input_grad[: self.n_tensors]
        tensor_grads = (g.to(t.dtype) if want else None for g, t, want in zip(grads, tensors, wanted))
        return (*tensor_grads, *(None,) * (self.n_scalars + 2))  # the scalars, norm, backend

    # -- the real implementation ----------------------------------------------------------------------------------

    def check_metadata(self, tensors, norm, backend, out) -> None:
        """Everything that holds on fake tensors: the tensors' metadata, ``norm``, ``backend`` and ``out``'s layout."""
        self.spec.check(*tensors)
        check_norm(norm)
        check_backend(backend)
        if out is not None:
            check_out(out, tensors[self.main_index], self.spec.main)

    def run(self, tensors, scalars, norm, backend, out=None) -> torch.Tensor:
        """Validate everything with the concrete values, resolve the backend, run (the registered ops' body)."""
        self.check_metadata(tensors, norm, backend, out)
        check_scalars(self.spec.scalars, scalars)
        return self._execute(validate_backend(self.spec.main, tensors[self.main_index], backend), tensors, scalars,
                             norm, out)

    def _execute(self, backend, tensors, scalars, norm, out) -> torch.Tensor:
        impl = self.spec.triton_impl if backend == "triton" else self.spec.torch_impl
        if not self.spec.has_out:
            return impl(*tensors, *scalars, norm)
        if out is not None and overlaps_other_than_alias(out, tensors):
            # A kernel program could overwrite elements another has still to read: compute aside, then copy.
            return out.copy_(impl(*tensors, *scalars, norm, out=None))
        return impl(*tensors, *scalars, norm, out=out)

    # -- the dispatcher -------------------------------------------------------------------------------------------

    def __call__(self, tensors: tuple, scalars: tuple, *, norm: str, out: torch.Tensor | None, backend: str):
        """The public function's body: see the module docstring."""
        name = self.spec.name
        if torch.compiler.is_compiling():
            # Everything but the scalar values is checked here; the values when the compiled graph runs.
            self.check_metadata(tensors, norm, backend, out)
            scalars = [as_scalar_tensor(n, v) for n, v in zip(self.spec.scalars, scalars)]
            if out is None:
                return self._op_st(*tensors, *scalars, norm, backend)
            refuse_grad_in_place(name, *tensors, out)
            self._op_out_st(out, *tensors, *scalars, norm, backend)
            return out
        scalars = tuple(as_number(n, v) for n, v in zip(self.spec.scalars, scalars))
        # Checked before dispatch too: the op schema would otherwise reject a non-tensor or a non-float with a
        # message that does not say what was expected.
        self.check_metadata(tensors, norm, backend, out)
        check_scalars(self.spec.scalars, scalars)
        if out is not None:
            refuse_grad_in_place(name, *tensors, out)
        if direct_call_ok(*tensors, out):
            backend = validate_backend(self.spec.main, tensors[self.main_index], backend)
            return self._execute(backend, tensors, scalars, norm, out)
        scalars = tuple(float(v) for v in scalars)
        if out is None:
            return self._op(*tensors, *scalars, norm, backend)
        self._op_out(out, *tensors, *scalars, norm, backend)
        return out

    # -- the public function --------------------------------------------------------------------------------------

    def signature(self) -> inspect.Signature:
        """The public function's signature: the tensors, ``scale``, the other scalars with their defaults, then
        keyword-only ``norm``, ``out`` (with ``out=``) and ``backend``."""
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        keyword = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter(n, positional) for n in self.spec.tensors]
        params += [inspect.Parameter(n, positional, default=SCALAR_DEFAULTS.get(n, inspect.Parameter.empty))
                   for n in self.spec.scalars]
        params.append(inspect.Parameter("norm", keyword, default=STRING_DEFAULTS["norm"]))
        if self.spec.has_out:
            params.append(inspect.Parameter("out", keyword, default=None))
        params.append(inspect.Parameter("backend", keyword, default=STRING_DEFAULTS["backend"]))
        return inspect.Signature(params)

    def public(self, fn=None, *, legacy_positional: tuple[str, ...] = ()):
        """Declare ``fn`` as this op's public function (a decorator). ``fn`` keeps its docstring and body (a call to
        this dispatcher); its signature must be ``signature()``, checked here at import.

        ``legacy_positional``: keyword-only arguments that earlier versions took positionally after the scalars, in
        that order. Such calls still work, with a ``DeprecationWarning``.
        """
        if fn is None:
            return functools.partial(self.public, legacy_positional=legacy_positional)
        strip = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]
        if strip(inspect.signature(fn)) != strip(self.signature()):
            raise TypeError(f"{fn.__name__}{inspect.signature(fn)} must have the signature {self.signature()}")
        if not legacy_positional:
            self.public_function = fn
            return fn
        n_positional = self.n_tensors + self.n_scalars

        @functools.wraps(fn)
        def public_function(*args, **kwargs):
            if len(args) > n_positional:
                args, kwargs = _legacy_positional(fn.__name__, args, kwargs, n_positional, legacy_positional)
            return fn(*args, **kwargs)

        self.public_function = public_function
        return public_function


def _legacy_positional(fn_name, args, kwargs, n_positional, legacy):
    """Move the arguments past ``n_positional`` to ``kwargs`` under the names ``legacy``, with a DeprecationWarning."""
    extra = args[n_positional:]
    if len(extra) > len(legacy):
        raise TypeError(
            f"{fn_name}() takes at most {n_positional} positional arguments (and, deprecated, "
            f"{', '.join(legacy)} after them), got {len(args)}"
        )
    names = legacy[: len(extra)]
    for name in names:
        if name in kwargs:
            raise TypeError(f"{fn_name}() got multiple values for argument {name!r}")
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"{fn_name}(): passing {', '.join(names)} positionally is deprecated and will stop working; pass "
            f"{', '.join(f'{n}=' for n in names)} by keyword",
            DeprecationWarning,
            stacklevel=3,
        )
    return args[:n_positional], {**kwargs, **dict(zip(names, extra))}
