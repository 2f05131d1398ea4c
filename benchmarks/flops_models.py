"""The flops suite's model registry: one entry per model configuration it counts.

An entry says what the configuration is (its name in the table, resolution and token counts), how to build the
full-size model on the meta device (no memory, no weights), how to build one step's inputs for each variant, and
which NAG modes the model has. Adding a model family (Wan, SDXL, SD3.5, Qwen-Image, Chroma, FLUX.2, Z-Image) is one
more entry here; the suite's loop does not change.

``step_inputs(batch)`` returns the keyword arguments of every forward one step of a variant makes: ``no_nag`` one
plain forward at batch ``B``; ``cfg`` two (the positive, then the negative prompt); ``nag`` one forward with ``2B``
text rows (positive, then NAG-negative) and ``B`` latent rows, as a NAG-patched model takes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import random_flux
from .configs import FLUX1, FLUX1_TEXT_TOKENS, FLUX_TINY, FLUX_TINY_TEXT_TOKENS, flux_image_tokens

META = torch.device("meta")
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class FlopsModel:
    key: str  # the --models name
    config: str  # the table's config column
    resolution: int
    image_tokens: int
    text_tokens: int
    build: Callable[[], torch.nn.Module]  # the full-size model on the meta device
    step_inputs: Callable[[int], dict[str, list[dict]]]  # batch -> {"no_nag": [...], "cfg": [...], "nag": [...]}
    nag_modes: tuple[str, ...] = ("exact", "fast")
    toy: bool = False  # a small stand-in for tests (--quick), not a real model


@functools.cache
def _flux_meta(config_name: str) -> torch.nn.Module:
    """One meta-device FluxTransformer2DModel per config, shared by that config's resolutions."""
    return random_flux.transformer(FLUX_CONFIGS[config_name], META, DTYPE)


FLUX_CONFIGS = {"FLUX.1": FLUX1, "flux-tiny": FLUX_TINY}


def _flux_step_inputs(config_name: str, resolution: int, text_tokens: int, batch: int) -> dict[str, list[dict]]:
    from .flux import make_inputs, split_rows

    nag = make_inputs(FLUX_CONFIGS[config_name], resolution, text_tokens, batch, 2 * batch, DTYPE, META)
    pos, neg = split_rows(nag, slice(0, batch)), split_rows(nag, slice(batch, 2 * batch))
    return {"no_nag": [pos], "cfg": [pos, neg], "nag": [nag]}


def flux(key: str, config_name: str, resolution: int, text_tokens: int, toy: bool = False) -> FlopsModel:
    return FlopsModel(
        key=key, config=config_name, resolution=resolution, image_tokens=flux_image_tokens(resolution),
        text_tokens=text_tokens, build=functools.partial(_flux_meta, config_name),
        step_inputs=functools.partial(_flux_step_inputs, config_name, resolution, text_tokens), toy=toy,
    )


MODELS: dict[str, FlopsModel] = {
    m.key: m
    for m in [
        # FLUX.1-dev / -schnell (configs.FLUX1), 512 T5 tokens.
        flux("flux1-1024", "FLUX.1", 1024, FLUX1_TEXT_TOKENS),
        flux("flux1-2048", "FLUX.1", 2048, FLUX1_TEXT_TOKENS),
        # The Flux-shaped toy (configs.FLUX_TINY): seconds on any machine, for tests and --quick.
        flux("flux-tiny-256", "flux-tiny", 256, FLUX_TINY_TEXT_TOKENS, toy=True),
        flux("flux-tiny-512", "flux-tiny", 512, FLUX_TINY_TEXT_TOKENS, toy=True),
    ]
}


def selected(names: str | None, quick: bool) -> list[FlopsModel]:
    """``--models`` (comma list of keys), else every real model (``--quick``: every toy)."""
    if not names:
        return [m for m in MODELS.values() if m.toy == quick]
    out = []
    for name in names.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown flops model {name!r}; known: {', '.join(MODELS)}")
        out.append(MODELS[name])
    return out
