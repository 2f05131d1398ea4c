"""Drop-in names for the authors' classes, so code written for their package runs with only its imports changed.

They are factories, not subclasses: each returns the stock diffusers object patched by ``apply_nag`` (subclassing the
transformer breaks LoRA ``set_adapters``, which looks classes up by name). ``isinstance`` checks therefore use the
stock classes (``FluxPipeline``, ``FluxTransformer2DModel``).
"""

from __future__ import annotations

from ..api import apply_nag


class NAGFluxTransformer2DModel:
    """``FluxTransformer2DModel`` patched with ``apply_nag`` (default NAG values): accepts the authors' ``2B``-text
    batch layout (see ``apply_nag``). ``NAGFluxTransformer2DModel.from_pretrained(...)`` takes the arguments of
    ``FluxTransformer2DModel.from_pretrained``."""

    def __new__(cls, *args, **kwargs):
        from diffusers import FluxTransformer2DModel

        return apply_nag(FluxTransformer2DModel(*args, **kwargs))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        from diffusers import FluxTransformer2DModel

        return apply_nag(FluxTransformer2DModel.from_pretrained(*args, **kwargs))

    @classmethod
    def from_config(cls, *args, **kwargs):
        from diffusers import FluxTransformer2DModel

        return apply_nag(FluxTransformer2DModel.from_config(*args, **kwargs))


class NAGFluxPipeline:
    """``FluxPipeline`` patched with ``apply_nag``: its call takes ``nag_negative_prompt``, ``nag_scale``, ... .
    ``NAGFluxPipeline.from_pretrained(...)`` takes the arguments of ``FluxPipeline.from_pretrained``."""

    def __new__(cls, *args, **kwargs):
        from diffusers import FluxPipeline

        return apply_nag(FluxPipeline(*args, **kwargs))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        from diffusers import FluxPipeline

        return apply_nag(FluxPipeline.from_pretrained(*args, **kwargs))

    @classmethod
    def from_pipe(cls, *args, **kwargs):
        from diffusers import FluxPipeline

        return apply_nag(FluxPipeline.from_pipe(*args, **kwargs))
