"""diffusers integration of nag-kernels (installed as ``nag_kernels.integrations``).

``apply_nag(pipe)`` patches a stock diffusers pipeline (or its model) in place for Normalized Attention Guidance;
``remove_nag`` undoes it; ``with nag(pipe, ...):`` does both. ``NAGFluxPipeline`` / ``NAGFluxTransformer2DModel``
are drop-in names for the authors' classes. Each model family is one module registering a ``Family``.
"""

import sys

try:
    import diffusers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nag_kernels.integrations needs diffusers: pip install 'nag-kernels[diffusers]'"
    ) from err

from . import versions

versions.check(diffusers.__version__)

# One module per model family (families/__init__.py lists them); each registers its Family for the model classes
# this diffusers has.
from . import families  # noqa: E402

families.load_all()

from .api import apply_nag, nag, remove_nag  # noqa: E402
from .config import NAGConfig  # noqa: E402
from .families.flux_dropin import NAGFluxPipeline, NAGFluxTransformer2DModel  # noqa: E402
from .guider import NAGGuidance  # noqa: E402
from .registry import supported_models, supported_pipelines  # noqa: E402

# The family modules' earlier paths (nag_kernels.integrations.flux, ...) stay importable.
for _name in (*families.FAMILIES, "flux_fast", "flux_dropin"):
    _module = sys.modules.get(f"{families.__name__}.{_name}")
    if _module is not None:
        sys.modules[f"{__name__}.{_name}"] = globals()[_name] = _module
sys.modules[f"{__name__}.dropin"] = sys.modules[f"{families.__name__}.flux_dropin"]
del _name, _module

__all__ = [
    "NAGConfig",
    "NAGFluxPipeline",
    "NAGFluxTransformer2DModel",
    "NAGGuidance",
    "apply_nag",
    "nag",
    "remove_nag",
    "supported_models",
    "supported_pipelines",
]
