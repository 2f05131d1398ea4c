"""Two rules every path of the package follows, in one place.

- The compute dtype: float64 inputs are computed in float64, every other float dtype in float32 (docs/spec.md, "The
  combine": norms and arithmetic accumulate in float32 whatever the input dtype; float64 inputs in float64).
- In-place writes (``out=``) have no autograd formula, so they are allowed only where autograd records nothing: grad
  mode off, or no input that requires grad.
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype to compute in for a tensor (or dtype) ``x``: ``torch.float64`` for float64, else ``torch.float32``."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` (grad mode on and one of them requires grad); where it
    does, results must be computed out of place (``None`` entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
