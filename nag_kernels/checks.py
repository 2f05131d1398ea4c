"""Input validation shared by every NAG entry point: clear errors that name the argument and what was expected."""

from __future__ import annotations

import math

import torch

from .reference import NORMS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


def check_params(scale: float, tau: float, alpha: float, norm: str) -> None:
    """NAG scalars: finite numbers, ``tau > 0``, ``alpha`` in [0, 1], a known norm."""
    for name, value in (("scale", scale), ("tau", tau), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
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
