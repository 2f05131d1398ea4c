"""The quality suite's pipeline: load any diffusers pipeline, find which NAG modes it has, make one image per variant.

- ``load_pipeline``: ``--tiny`` builds ``random_flux.tiny_pipeline``; otherwise ``--pipeline-class NAME`` (a diffusers
  class such as ``FluxPipeline``, ``Flux2Pipeline``, ``ZImagePipeline``, ``WanPipeline``) or, by default,
  ``DiffusionPipeline.from_pretrained``, which reads the class from the model's ``model_index.json``.
- ``nag_modes``: which of exact and fast mode ``apply_nag`` accepts for this pipeline (exact is required: without it
  there is nothing to measure; fast is measured where the model's family implements it).
- ``generate``: one call from a seeded CPU generator; only the arguments the pipeline's ``__call__`` takes are passed
  (``max_sequence_length`` and ``num_frames`` are not universal). Images come back as ``[3, H, W]``, videos as
  ``[F, 3, H, W]``, float32 in ``[0, 1]`` on the CPU.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from . import harness as h
from . import random_flux

MODES = {"nag_exact": "exact", "nag_fast": "fast"}


def pipeline_class(name: str | None):
    """The diffusers class ``--pipeline-class`` names (``DiffusionPipeline`` when none: the model's own class)."""
    import diffusers

    if name is None:
        return diffusers.DiffusionPipeline
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise SystemExit(f"--pipeline-class {name}: diffusers {diffusers.__version__} has no pipeline class of that name")
    return cls


def load_pipeline(settings, device: torch.device, offload: bool):
    if settings.tiny:
        pipe = random_flux.tiny_pipeline(settings.dtype).to(device)
    else:
        pipe = pipeline_class(settings.pipeline_class).from_pretrained(settings.model, torch_dtype=settings.dtype)
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_parameters(pipe) -> set[str]:
    """The keyword arguments the stock pipeline's ``__call__`` names (read before NAG patches the call)."""
    return set(inspect.signature(type(pipe).__call__).parameters)


def nag_modes(pipe, nag: dict, api, model: str) -> dict[str, str]:
    """``{"exact": "supported", "fast": "supported" | why not}``; exits naming ``--model`` when exact mode fails."""
    apply_nag, remove_nag = api
    try:
        remove_nag(apply_nag(pipe, mode="exact", **nag))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--model {model}: NAG cannot be applied to {type(pipe).__name__}: {h.error_text(exc)}") from None
    modes = {"exact": "supported"}
    try:
        remove_nag(apply_nag(pipe, mode="fast", **nag))
        modes["fast"] = "supported"
    except (TypeError, ValueError) as exc:  # the family has no fast mode
        remove_nag(pipe)
        modes["fast"] = f"not supported by this model ({h.error_text(exc)})"
    return modes


@contextlib.contextmanager
def nag_applied(pipe, variant: str, nag: dict, api):
    """The variant's NAG on ``pipe`` for the block (nothing for ``no_nag``), removed after it."""
    if variant == "no_nag":
        yield
        return
    apply_nag, remove_nag = api
    apply_nag(pipe, mode=MODES[variant], **nag)
    try:
        yield
    finally:
        remove_nag(pipe)


def generate(pipe, accepted: set[str], prompt: str, negative: str, seed: int, settings, variant: str) -> torch.Tensor:
    """One image ``[3, H, W]`` (or video ``[F, 3, H, W]``) in ``[0, 1]``; the NAG variants get the NAG negative."""
    kwargs = dict(num_inference_steps=settings.steps, height=settings.height, width=settings.width,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    optional = dict(guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                    num_frames=settings.num_frames)
    kwargs.update({k: v for k, v in optional.items() if v is not None and k in accepted})
    if variant != "no_nag":
        kwargs.update(nag_negative_prompt=negative, **settings.nag)
    with torch.no_grad():
        out = pipe(prompt=prompt, **kwargs)  # by name: FLUX.2 pipelines take the image first
    media = out.images if hasattr(out, "images") else out.frames
    return torch.as_tensor(media[0]).detach().float().clamp(0, 1).cpu()


def to_pil(image: torch.Tensor):
    """A PIL image of ``[3, H, W]``, or of the middle frame of ``[F, 3, H, W]``."""
    from PIL import Image

    if image.ndim == 4:
        image = image[image.shape[0] // 2]
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)
