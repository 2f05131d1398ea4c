"""Code written for the authors' NAG package runs with only its imports changed (tiny random weights, offline).

The authors document this usage: load their transformer class with ``from_pretrained(<path>, subfolder=
"transformer", torch_dtype=...)``, pass it to their pipeline class's ``from_pretrained(<path>, transformer=...,
torch_dtype=...)``, then call the pipeline with ``nag_negative_prompt`` and ``nag_scale``. This test writes that
pattern against ``nag_kernels.integrations.NAGFluxTransformer2DModel`` / ``NAGFluxPipeline`` and a tiny FLUX.1
pipeline saved to a temporary folder (``flux_toy``), and checks what the call does: it guides the output, it computes
what ``apply_nag`` on a stock pipeline loaded from the same files computes, and the objects are the stock diffusers
classes.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import flux_toy
from nag_kernels.integrations import apply_nag

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # torch_dtype= is the spelling that loads on every supported diffusers (0.35 has no dtype=); 0.42 warns about it.
    pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning"),
]

PROMPT = "a cat."  # short: the toy tokenizers have one token per character and max_sequence_length 8
NAG_NEGATIVE = "hats."
DTYPE = torch.float64  # the saved weights are float32: the loaded dtype shows that torch_dtype reached the models
# What this test adds to the documented call: a small image, few steps, a fixed seed (CPU time, comparisons).
SMALL = dict(height=flux_toy.SIZE, width=flux_toy.SIZE, num_inference_steps=2)


def _seed():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux-toy")
    flux_toy.pipeline(FluxPipeline, dtype=torch.float32).save_pretrained(path)
    return str(path)


def _load_dropin(path):
    """The authors' loading code with their import replaced by this package's."""
    from nag_kernels.integrations import NAGFluxPipeline, NAGFluxTransformer2DModel

    transformer = NAGFluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=DTYPE)
    pipe = NAGFluxPipeline.from_pretrained(path, transformer=transformer, torch_dtype=DTYPE)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, **kwargs):
    out = pipe(
        PROMPT,
        guidance_scale=0.0,
        max_sequence_length=flux_toy.SEQ_LEN,
        generator=_seed(),
        output_type="latent",
        **SMALL,
        **kwargs,
    )
    return out.images


def test_authors_usage_pattern_runs_with_only_imports_changed(saved):
    pipe = _load_dropin(saved)

    # The authors' sampling call (plus SMALL and a seed).
    image = pipe(
        PROMPT,
        nag_negative_prompt=NAG_NEGATIVE,
        guidance_scale=0.0,
        nag_scale=5.0,
        max_sequence_length=flux_toy.SEQ_LEN,
        generator=_seed(),
        **SMALL,
    ).images[0]

    assert isinstance(image, PIL.Image.Image) and image.size == (flux_toy.SIZE, flux_toy.SIZE)
    # Factories, not subclasses: the stock diffusers classes (LoRA and name lookups keep working).
    assert type(pipe).__name__ == "FluxPipeline" and isinstance(pipe, FluxPipeline)
    assert type(pipe.transformer) is FluxTransformer2DModel
    assert pipe.transformer.dtype == DTYPE and pipe.vae.dtype == DTYPE


def test_dropin_guides_like_apply_nag_on_a_stock_pipeline(saved):
    pipe = _load_dropin(saved)
    guided = _latents(pipe, nag_negative_prompt=NAG_NEGATIVE, nag_scale=5.0)
    plain = _latents(pipe)
    off = _latents(pipe, nag_negative_prompt=NAG_NEGATIVE, nag_scale=1.0)
    weaker = _latents(pipe, nag_negative_prompt=NAG_NEGATIVE, nag_scale=3.0)

    assert torch.isfinite(guided).all()
    # NAG changes the output, the call-time nag_scale reaches the transformer, and scale 1 is plain.
    assert (guided - plain).abs().max() > 1e-6  # float64: far above rounding
    assert (guided - weaker).abs().max() > 1e-6
    torch.testing.assert_close(off, plain, rtol=0, atol=0)

    stock = FluxPipeline.from_pretrained(saved, torch_dtype=DTYPE)
    stock.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_latents(stock), plain, rtol=0, atol=0)  # the drop-in's plain call is the stock call
    apply_nag(stock)
    torch.testing.assert_close(
        _latents(stock, nag_negative_prompt=NAG_NEGATIVE, nag_scale=5.0), guided, rtol=0, atol=0
    )
