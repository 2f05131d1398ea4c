"""Input validation shared by every NAG entry point: clear errors that name the argument and what was expected."""

from __future__ import annotations

import math

import torch

from .reference import NORMS

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
    """NAG scalars: finite numbers, ``tau > 0``, ``alpha`` in [0, 1], a known norm.

    The types and ``norm`` are always checked. The values are checked where they are concrete Python numbers
    outside ``torch.compile`` tracing, and skipped while it traces: a scalar that dynamo made dynamic is a SymFloat,
    whose finiteness and sign cannot be asked without a graph break or a guard (a recompile per value), and an error
    raised while tracing would surface as dynamo's ``Unsupported``, not as this ``ValueError``. Nothing is lost:
    the ops' real implementations check the concrete values when the compiled graph runs, so a bad value raises
    the same ``ValueError`` there.
    """
    for name, value in zip(SCALARS, (scale, tau, alpha)):
        check_real(name, value)
    check_norm(norm)
    if torch.compiler.is_compiling():
        return
    for name, value in zip(SCALARS, (scale, tau, alpha)):
        if not _is_symbolic(value) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not _is_symbolic(tau) and tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not _is_symbolic(alpha) and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


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


def check_pair(z_pos: torch.Tensor, z_neg: torch.Tensor, dtypes=DTYPES) -> None:
    """``z_pos``/``z_neg``: same shape ``[..., C]``, same supported dtype and device, last dim contiguous."""
    check_float_tensor("z_pos", z_pos, dtypes)
    check_like("z_neg", z_neg, "z_pos", z_pos)
    check_last_dim_contiguous("z_pos", z_pos)
    check_last_dim_contiguous("z_neg", z_neg)
