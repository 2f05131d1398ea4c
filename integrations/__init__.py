"""diffusers integration of nag-kernels (installed as ``nag_kernels.integrations``).

``apply_nag(pipe)`` patches a stock diffusers pipeline (or its model) in place for Normalized Attention Guidance;
``remove_nag`` undoes it; ``with nag(pipe, ...):`` does both. ``NAGFluxPipeline`` / ``NAGFluxTransformer2DModel``
are drop-in names for the authors' classes. Each model family is one module registering a ``Family``.
"""

try:
    import diffusers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nag_kernels.integrations needs diffusers: pip install 'nag-kernels[diffusers]'"
    ) from err

from . import versions

versions.check(diffusers.__version__)

# One module per model family; each registers its Family (family.py) for the model classes this diffusers has.
from . import flux  # noqa: E402,F401  (FLUX.1, Kontext, Fill, Control)
from . import chroma  # noqa: E402,F401  (Chroma)
from . import flux2  # noqa: E402,F401  (FLUX.2 [dev] / [klein])
from . import zimage  # noqa: E402,F401  (Z-Image)
from . import sd3  # noqa: E402,F401  (SD3 / SD3.5)
from . import qwenimage  # noqa: E402,F401  (Qwen-Image)
from . import wan  # noqa: E402,F401  (Wan 2.1 / 2.2)
from . import sdxl  # noqa: E402,F401  (SDXL)
from . import ltx  # noqa: E402,F401  (LTX-Video)
from .api import apply_nag, nag, remove_nag  # noqa: E402
from .config import NAGConfig  # noqa: E402
from .dropin import NAGFluxPipeline, NAGFluxTransformer2DModel  # noqa: E402
from .registry import supported_models, supported_pipelines  # noqa: E402

__all__ = [
    "NAGConfig",
    "NAGFluxPipeline",
    "NAGFluxTransformer2DModel",
    "apply_nag",
    "nag",
    "remove_nag",
    "supported_models",
    "supported_pipelines",
]
