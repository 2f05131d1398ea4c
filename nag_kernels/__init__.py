"""nag-kernels: fused Normalized Attention Guidance (NAG) for PyTorch and diffusers."""

from .merge_ops import nag_merge
from .ops import nag
from .partial_norm_ops import nag_partial_norms, nag_with_norms
from .reference import nag_merge_reference, nag_reference

__version__ = "0.1.0"

__all__ = ["__version__", "nag", "nag_merge", "nag_merge_reference", "nag_partial_norms", "nag_reference",
           "nag_with_norms"]
