"""Input validation shared by every NAG entry point: clear errors that name the argument and what was expected."""

from __future__ import annotations

import math

import torch

NORMS = ("l1", "l2")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")
SCALARS = ("scale", "tau", "alpha")


def check_scalar_tensor(name: str, value: torch.Tensor) -> None:
    """A NAG scalar given as a tensor: 0-dim, real (not bool or complex), any device."""
    if value.dim() != 0:
        raise ValueError(f"{name} must be a real number or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got a tensor of dtype {value.dtype}")


def as_number(name: str, value):
    """A NAG scalar as a Python number: a 0-dim real tensor (on any device; a GPU one waits for the device) is read
    with ``.item()``, as ``torch.ops.nag_kernels.nag`` itself does; anything else is returned for ``check_params``."""
    if not isinstance(value, torch.Tensor):
        return value
    check_scalar_tensor(name, value)
    return value.detach().item()


def as_scalar_tensor(name: str, value) -> torch.Tensor:
    """A NAG scalar as a 0-dim float64 CPU tensor, the form the ``*_scalar_tensors`` ops take under
    ``torch.compile``: there a scalar that changes between calls stays one dynamic graph input instead of being
    specialized (one compiled graph per value). A number is multiplied into a tensor rather than passed to
    ``torch.scalar_tensor``, which Inductor's float handling would specialize; a tensor is copied to the CPU."""
    if isinstance(value, torch.Tensor):
        check_scalar_tensor(name, value)
        return value.detach().to(device="cpu", dtype=torch.float64)
    check_real(name, value)
    return torch.ones((), dtype=torch.float64, device="cpu") * value


def check_real(name: str, value) -> None:
    """A Python ``int`` or ``float`` (not ``bool``), or a symbolic one while ``torch.compile`` traces."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _is_symbolic(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat))


def check_params(scale: float, tau: float, alpha: float, norm: str) -> None:
    """NAG scalars and norm: ``scale >= 1`` (1 turns NAG off), ``tau > 0``, ``alpha`` in [0, 1], all finite; a known
    norm. See ``check_scalars`` for when the values are checked."""
    check_norm(norm)
    check_scalars(SCALARS, (scale, tau, alpha))


def check_scalars(names, values) -> None:
    """NAG scalars by name (``"scale"``, ``"tau"``, ``"alpha"``, any subset): real numbers, finite, ``scale >= 1``,
    ``tau > 0``, ``alpha`` in [0, 1] (docs/spec.md, "The combine").

    The types are always checked. The values are checked where they are concrete Python numbers outside
    ``torch.compile`` tracing, and skipped while it traces: a scalar that dynamo made dynamic is a SymFloat, whose
    finiteness and sign cannot be asked without a graph break or a guard (a recompile per value), and an error
    raised while tracing would surface as dynamo's ``Unsupported``, not as this ``ValueError``. Nothing is lost:
    the ops' real implementations check the concrete values when the compiled graph runs, so a bad value raises
    the same ``ValueError`` there.
    """
    for name, value in zip(names, values):
        check_real(name, value)
    if torch.compiler.is_compiling():
        return
    concrete = {name: value for name, value in zip(names, values) if not _is_symbolic(value)}
    for name, value in concrete.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if "scale" in concrete and concrete["scale"] < 1:
        raise ValueError(f"scale must be >= 1 (1 turns NAG off), got {concrete['scale']}")
    if "tau" in concrete and concrete["tau"] <= 0:
        raise ValueError(f"tau must be > 0, got {concrete['tau']}")
    if "alpha" in concrete and not 0 <= concrete["alpha"] <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {concrete['alpha']}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_float_tensor(name: str, x: torch.Tensor, dtypes=DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dim (the channel dim C), got a 0-dim tensor")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must match ``ref`` in shape, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dim (stride 1), got stride {x.stride(-1)}; "
            f"leading dims may be strided, e.g. hidden[:, text_len:]"
        )


def check_out(out: torch.Tensor, ref: torch.Tensor, ref_name: str = "z_pos") -> None:
    """``out=``: the shape, dtype and device of ``ref``, last dim contiguous, and no two elements at one address (a
    stride-0 ``expand()`` would have several results written to one place, in no defined order). Metadata only, so
    fake and meta tensors are checked too; overlap with the inputs is ``overlaps_other_than_alias``'s, at run time."""
    check_like("out", out, ref_name, ref)
    check_last_dim_contiguous("out", out)
    if may_self_overlap(out):
        raise ValueError(
            f"out must not have overlapping elements, got strides {tuple(out.stride())} for shape {tuple(out.shape)} "
            "(e.g. an expand()ed tensor); pass a tensor whose elements are distinct, e.g. out.contiguous()"
        )


def check_pair(z_pos: torch.Tensor, z_neg: torch.Tensor, dtypes=DTYPES) -> None:
    """``z_pos``/``z_neg``: same shape ``[..., C]``, same supported dtype and device, last dim contiguous."""
    check_float_tensor("z_pos", z_pos, dtypes)
    check_like("z_neg", z_neg, "z_pos", z_pos)
    check_last_dim_contiguous("z_pos", z_pos)
    check_last_dim_contiguous("z_neg", z_neg)


# ----------------------------------------------------------------------------------------------------------------
# Memory overlap of out= with itself and with the inputs.
#
# Built on public tensor metadata only (sizes, strides, ``data_ptr()``, ``element_size()``): torch's own overlap
# checks (``torch._C._debug_has_internal_overlap``, ``torch._prims_common``) are private. PyTorch tensors never have
# negative strides, so a tensor touches exactly the bytes from ``data_ptr()`` to its last element.


def may_self_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share an address. The dims of size > 1 sorted by stride must each step past
    every element the smaller ones reach (``stride > sum((size - 1) * stride)`` of those): a proof of distinct
    elements that every layout from slicing, transposing, permuting or ``narrow`` passes; a stride 0 (``expand``)
    fails it, and so would an exotic ``as_strided`` whose elements happen to be distinct. Not asked while
    ``torch.compile`` traces, nor of symbolic sizes, to not add guards: the real run checks the concrete tensor."""
    if torch.compiler.is_compiling() or t.is_contiguous():
        return False
    dims = [(stride, size) for stride, size in zip(t.stride(), t.shape) if type(size) is not int or size > 1]
    if not all(type(stride) is int and type(size) is int for stride, size in dims):
        return False
    reach = 0
    for stride, size in sorted(dims):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    last = 0
    for size, stride in zip(t.shape, t.stride()):
        last += (size - 1) * stride
    return start, start + (last + 1) * t.element_size()


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements at the same addresses: same start, dtype, shape, and strides
    (those of size-1 dims aside, which address nothing)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)
    )


def overlaps_other_than_alias(out: torch.Tensor, inputs) -> bool:
    """Whether ``out`` shares memory with one of ``inputs`` other than as exactly the same view (``out=z_pos``).

    The kernels read each element of a token before the same program writes it, so an exact alias is safe in place;
    any other overlap (``out`` shifted by a token against ``z_pos``, or over the ``norms``) would let one program
    overwrite what another has still to read. Conservative: byte ranges that intersect count as overlap even where
    the elements interleave without touching (the caller then computes into a temporary, still correct). Needs real
    tensors (``data_ptr``), not fake or meta ones."""
    if out.numel() == 0:
        return False
    lo, hi = _byte_span(out)
    for t in inputs:
        if t is out or t.numel() == 0:  # ``out=z_pos`` itself: the same view
            continue
        t_lo, t_hi = _byte_span(t)
        if t_lo < hi and lo < t_hi and not same_view(out, t):
            return True
    return False
