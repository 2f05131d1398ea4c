"""The registered ``torch.library`` ops and the public ``nag`` function.

``torch.ops.nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto")`` returns a new tensor;
``torch.ops.nag_kernels.nag_out(out, z_pos, z_neg, scale, tau, alpha, norm, backend)`` writes into ``out`` (which may
alias ``z_pos``). Both have fake implementations, so they run on meta tensors (no kernel launch) and trace under
``torch.compile(fullgraph=True)``; Inductor treats them as opaque calls.

Backends: ``"triton"`` is the fused kernel of ``combine.py``: CUDA/ROCm tensors, or CPU
tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests). ``"torch"`` is ``torch_backend.nag_torch``,
fused PyTorch ops on any device. ``"auto"`` picks Triton where it can run and PyTorch elsewhere.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .checks import check_backend, check_last_dim_contiguous, check_like, check_pair, check_params
from .torch_backend import nag_torch


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


_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend) -> None:
    """Device-independent checks, shared by the public function, the op and its fake impl."""
    check_pair(z_pos, z_neg, dtypes=_OP_DTYPES)
    check_params(scale, tau, alpha, norm)
    check_backend(backend)


def validate_backend(name: str, tensor: torch.Tensor, backend: str) -> str:
    """``resolve_backend`` for ``tensor``'s device, refusing float64 (argument ``name``) on the Triton kernels, which
    have no float64 path."""
    backend = resolve_backend(backend, tensor.device)
    if backend == "triton" and tensor.dtype == torch.float64:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='triton', got torch.float64")
    return backend


def _validate(z_pos, z_neg, scale, tau, alpha, norm, backend) -> str:
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    return validate_backend("z_pos", z_pos, backend)


def _run(z_pos, z_neg, scale, tau, alpha, norm, backend, out):
    """Run a validated call on its resolved backend."""
    if backend == "triton":
        from .combine import launch_nag

        return launch_nag(z_pos, z_neg, scale, tau, alpha, norm, out=out)
    return nag_torch(z_pos, z_neg, scale, tau, alpha, norm, out=out)


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call may skip the ``torch.library`` dispatcher and run the implementation directly.

    The dispatcher costs tens of microseconds of host time per call, which dominates at Flux sizes when the GPU is
    not ahead of the host: on an H200 machine a 27 us kernel took 157 us per call through the op, and a call that
    skips it costs 47 us of host time (benchmarks/results/h200-20261127-run1 and run3).
    The op is needed only where something must see it: ``torch.compile`` tracing, tensor subclasses (fake/functional
    tensors), meta tensors, an active ``TorchDispatchMode`` (e.g. ``FlopCounterMode``), and autograd (which the op
    refuses with a clear error). Plain eager calls on real tensors compute the same thing either way.
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


@torch.library.custom_op("nag_kernels::nag", mutates_args=())
def nag_op(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> torch.Tensor:
    backend = _validate(z_pos, z_neg, scale, tau, alpha, norm, backend)
    return _run(z_pos, z_neg, scale, tau, alpha, norm, backend, out=None)


@nag_op.register_fake
def _nag_fake(z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto"):
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    return z_pos.new_empty(z_pos.shape)


@torch.library.custom_op("nag_kernels::nag_out", mutates_args=("out",))
def nag_out_op(
    out: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> None:
    backend = _validate(z_pos, z_neg, scale, tau, alpha, norm, backend)
    check_like("out", out, "z_pos", z_pos)
    check_last_dim_contiguous("out", out)
    _run(z_pos, z_neg, scale, tau, alpha, norm, backend, out=out)


@nag_out_op.register_fake
def _nag_out_fake(out, z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto"):
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    check_like("out", out, "z_pos", z_pos)
    check_last_dim_contiguous("out", out)


def nag(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float = 2.5,
    alpha: float = 0.25,
    *,
    norm: str = "l1",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Normalized Attention Guidance combine, fused: one pass over memory on GPU.

    For each token (row of the last dim ``C``)::

        z_t = scale * z_pos - (scale - 1) * z_neg
        out = alpha * min(1, tau * ||z_pos|| / ||z_t||) * z_t + (1 - alpha) * z_pos

    with the factor 1 where ``||z_t|| = 0``; see ``nag_kernels.nag_reference`` for the exact semantics.

    Args:
        z_pos: ``(..., C)`` attention output under the positive context (heads merged, before the output
            projection). float32, float16 or bfloat16 (float64 on the ``"torch"`` backend). The last dim must be
            contiguous; leading dims may be strided (e.g. ``hidden[:, text_len:]``) and are not copied.
        z_neg: ``(..., C)`` attention output under the NAG-negative context; same shape, dtype and device.
        scale: extrapolation scale ``nag_scale`` (1 = NAG off; typical 3-11).
        tau: clamp of the norm ratio ``||z_t|| / ||z_pos||`` (> 0; typical 2.5).
        alpha: blend weight in [0, 1] (typical 0.125-0.5).
        norm: ``"l1"`` (the paper's, default) or ``"l2"`` (the authors' diffusers Flux file).
        out: optional ``(..., C)`` output tensor of the same dtype and device; may be ``z_pos`` itself (in place).
        backend: ``"auto"`` (Triton on CUDA/ROCm and under ``TRITON_INTERPRET=1``, PyTorch otherwise),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., C)`` tensor in the input dtype (``out`` when given). Norms and arithmetic run in float32.

    Example::

        >>> z_pos, z_neg = torch.randn(2, 1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
        >>> guided = nag_kernels.nag(z_pos, z_neg, scale=5.0, tau=2.5, alpha=0.25)
    """
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)  # before the op's own schema checks
    if out is not None:
        check_like("out", out, "z_pos", z_pos)
        check_last_dim_contiguous("out", out)
    if direct_call_ok(z_pos, z_neg, out):
        return _run(z_pos, z_neg, scale, tau, alpha, norm, validate_backend("z_pos", z_pos, backend), out)
    if out is None:
        return torch.ops.nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm, backend)
    torch.ops.nag_kernels.nag_out(out, z_pos, z_neg, scale, tau, alpha, norm, backend)
    return out
