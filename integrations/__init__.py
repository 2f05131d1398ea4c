"""diffusers integration of nag-kernels (installed as ``nag_kernels.integrations``).

``apply_nag(pipe)`` patches a stock diffusers pipeline (or its transformer) in place for Normalized Attention
Guidance; ``remove_nag`` undoes it. ``NAGFluxPipeline`` / ``NAGFluxTransformer2DModel`` are drop-in names for the
authors' classes.
"""

try:
    import diffusers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nag_kernels.integrations needs diffusers: pip install 'nag-kernels[diffusers]'"
    ) from err

from .api import apply_nag, remove_nag
from .config import NAGConfig
from .dropin import NAGFluxPipeline, NAGFluxTransformer2DModel

__all__ = ["NAGConfig", "NAGFluxPipeline", "NAGFluxTransformer2DModel", "apply_nag", "remove_nag"]
