"""nag-kernels: fused Normalized Attention Guidance (NAG) for PyTorch and diffusers."""

from .ops import nag
from .reference import nag_reference

__version__ = "0.1.0"

__all__ = ["__version__", "nag", "nag_reference"]
