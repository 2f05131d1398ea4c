"""apply_nag on stock Z-Image pipelines: NAG arguments (Turbo-style without CFG, and with CFG guiding only the
conditional rows), prompt lists, pre-encoded negatives, img2img and inpainting.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
float64 implementation of the 2B layout (``zimage_reference``) fed the NAG negative's embeds from ``encode_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

import zimage_reference
import zimage_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=zimage_toy.SIZE, width=zimage_toy.SIZE, num_inference_steps=2, max_sequence_length=64,
              output_type="latent")


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (zimage_toy.SIZE, zimage_toy.SIZE, 3), dtype=np.uint8))


def negative_embeds(pipe, negative, images_per_prompt=1):
    embeds, _ = pipe.encode_prompt(negative, do_classifier_free_guidance=False, max_sequence_length=64)
    return [e for e in embeds for _ in range(images_per_prompt)]


def reference_forward(model, negative=None, calls=None, **nag):
    """A stand-in for ``model.forward``: the 2B layout, ``negative`` appended to the conditional rows (the first
    ``len(negative)`` latents; a CFG call's unconditional rows follow them)."""

    def forward(x, t, cap_feats, return_dict=True, joint_attention_kwargs=None, **_):
        if calls is not None:
            calls.append((len(x), len(cap_feats)))
        if negative is None:
            return (zimage_reference.zimage_forward(model, x, t, cap_feats),)
        b = len(negative)
        out = zimage_reference.zimage_forward(model, x[:b], t[:b], list(cap_feats[:b]) + negative, **nag)
        if len(x) > b:  # CFG: the unconditional rows run plain
            out += zimage_reference.zimage_forward(model, x[b:], t[b:], cap_feats[b:])
        return (out,)

    return forward


def run_reference(pipe, forward, **kwargs):
    pipe.transformer.forward = forward
    try:
        with torch.no_grad():
            return pipe(**kwargs).images
    finally:
        del pipe.transformer.forward


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls,extra", [
    (ZImagePipeline, {"guidance_scale": 0.0}),  # Z-Image-Turbo's setting
    (ZImagePipeline, {"guidance_scale": 3.0}),  # CFG: NAG on the conditional rows only
    (ZImageImg2ImgPipeline, {"guidance_scale": 0.0, "image": _image(1), "strength": 0.9}),
    (ZImageInpaintPipeline, {"guidance_scale": 0.0, "image": _image(1), "mask_image": _image(2), "strength": 0.9}),
], ids=["turbo", "cfg", "img2img", "inpaint"])
def test_nag_negative_prompt_equals_the_2b_layout(cls, extra):
    pipe = zimage_toy.pipeline(cls)
    prompt, negative_text = "a cat", "blurry, low quality, watermark, text"  # captions of other padded lengths
    negative = negative_embeds(pipe, negative_text)
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, calls=calls),
                             prompt=prompt, generator=gen(), **COMMON, **extra)
    cfg = extra["guidance_scale"] > 0
    assert calls == [(2, 2) if cfg else (1, 1)] * 2
    plain = run_reference(pipe, reference_forward(pipe.transformer), prompt=prompt, generator=gen(), **COMMON, **extra)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt=prompt, nag_negative_prompt=negative_text, generator=gen(), **COMMON, **extra).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # the pipeline's latents are float32
    assert (out - plain).abs().max() > 1e-4
    stock = pipe(prompt=prompt, generator=gen(), **COMMON, **extra).images
    torch.testing.assert_close(stock, plain, rtol=0, atol=1e-6)
    remove_nag(pipe)
    assert type(pipe) is cls


def test_prompt_lists_images_per_prompt_and_pre_encoded_negatives():
    pipe = zimage_toy.pipeline()
    prompts = ["a cat", "a dog on a long sandy beach"]
    negative = negative_embeds(pipe, ["blurry", "dark and noisy"], images_per_prompt=2)
    common = dict(prompt=prompts, num_images_per_prompt=2, guidance_scale=0.0, **COMMON)
    forward = reference_forward(pipe.transformer, negative, nag_scale=7.0)
    expected = run_reference(pipe, forward, generator=gen(), **common)
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt=["blurry", "dark and noisy"], nag_scale=7.0, generator=gen(), **common).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    pre = pipe(nag_negative_prompt_embeds=negative[::2], nag_scale=7.0, generator=gen(), **common).images
    torch.testing.assert_close(pre, expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="nag_negative_prompt_embeds"):
        pipe(nag_negative_prompt_embeds=torch.zeros(2, 3, 4), generator=gen(), **common)


def test_prompt_embeds_without_prompt_warns_that_nag_cannot_act():
    # With prompt_embeds alone the pipeline never calls encode_prompt: no NAG rows can be appended; say so.
    pipe = zimage_toy.pipeline()
    embeds = negative_embeds(pipe, "a cat")
    apply_nag(pipe, backend="torch")
    with pytest.warns(UserWarning, match="prompt_embeds without prompt"):
        pipe(prompt_embeds=embeds, nag_negative_prompt="blurry", guidance_scale=0.0, generator=gen(), **COMMON)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NAG call that guides, and a plain call, do not warn
        pipe(prompt="a cat", prompt_embeds=embeds, nag_negative_prompt="blurry", guidance_scale=0.0, generator=gen(),
             **COMMON)
        pipe(prompt_embeds=embeds, guidance_scale=0.0, generator=gen(), **COMMON)
        pipe(prompt="a cat", nag_negative_prompt="blurry", nag_end=0.5, guidance_scale=0.0, generator=gen(), **COMMON)
