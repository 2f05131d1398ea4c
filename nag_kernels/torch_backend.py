"""NAG in fused PyTorch ops: the backend for machines without Triton (CPU, Apple MPS).

Same math as ``reference.nag_reference`` with fewer passes over memory: the extrapolation is one ``lerp``
(``lerp(z_neg, z_pos, scale) = scale * z_pos - (scale - 1) * z_neg``), the norms are two reductions straight into
``[..., 1]`` tensors (no expanded full-size ratio tensors as in the authors' formula), and the blend runs in place on
the extrapolated tensor. Computes in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from .reference import token_norm


def nag_torch(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = torch.float64 if z_pos.dtype == torch.float64 else torch.float32
    zp = z_pos.to(dtype)
    zt = torch.lerp(z_neg.to(dtype), zp, float(scale))
    norm_pos = token_norm(zp, norm)
    norm_t = token_norm(zt, norm)
    one = torch.ones_like(norm_t)
    # factor = min(1, tau * |zp| / |zt|), 1 where |zt| = 0; torch.minimum keeps a NaN norm NaN.
    factor = torch.where(norm_t == 0, one, torch.minimum(one, norm_pos.mul_(tau).div_(norm_t)))
    result = zt.mul_(factor.mul_(alpha)).add_(zp, alpha=1 - alpha)
    if out is None:
        return result.to(z_pos.dtype)
    return out.copy_(result)
