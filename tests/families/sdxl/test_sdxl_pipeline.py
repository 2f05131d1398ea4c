"""apply_nag on the stock SDXL pipelines (text-to-image, img2img, inpaint): NAG arguments, batched CFG, batches,
bad input.

Expected outputs come from a stock pipeline on the same components whose UNet is an unpatched copy running the
authors' cross-attention (``test_sdxl_unet.authors_unet``), with the NAG negative's embeddings (from
``encode_prompt``) appended to the text of every UNet call whose last rows are the positive embeddings (CFG's
batched call: ``[uncond; cond]`` becomes ``[uncond; cond; NAG-negative]``).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

import sdxl_toy
from nag_kernels.integrations import call_state
from nag_kernels.integrations import apply_nag, remove_nag
from test_sdxl_unet import authors_unet

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=sdxl_toy.SIZE, width=sdxl_toy.SIZE, num_inference_steps=2, output_type="latent")


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (sdxl_toy.SIZE, sdxl_toy.SIZE, 3), dtype=np.uint8))


EXTRA = {
    StableDiffusionXLPipeline: {"latents": sdxl_toy.latents(1)},
    StableDiffusionXLImg2ImgPipeline: {"image": _image(1), "strength": 0.9},
    StableDiffusionXLInpaintPipeline: {"image": _image(1), "mask_image": _image(2), "strength": 0.9},
}


def embeds(pipe, prompt, per_prompt=1):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, num_images_per_prompt=per_prompt, do_classifier_free_guidance=False)[0]


def reference(pipe, positive, negative, nag_end=1.0, **nag):
    def append(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        rows = positive.shape[0]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        on = float(t.reshape(-1)[0]) >= (1 - nag_end) * 1000
        if on and text.shape[1:] == positive.shape[1:] and torch.allclose(text[-rows:], positive, rtol=0, atol=1e-12):
            kwargs = {**kwargs, "encoder_hidden_states": torch.cat([text, negative])}
        return args, kwargs

    parts = dict(pipe.components)
    parts["unet"] = authors_unet(parts["unet"], **nag)
    parts["unet"].register_forward_pre_hook(append, with_kwargs=True)
    ref = type(pipe)(**parts)
    ref.set_progress_bar_config(disable=True)
    return ref


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls", list(EXTRA), ids=lambda c: c.__name__)
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["nag-only", "cfg"])
def test_every_sdxl_pipeline_matches_the_authors(cls, guidance):
    pipe = sdxl_toy.pipeline(cls)
    kw = {**COMMON, **EXTRA[cls], "guidance_scale": guidance, "prompt": "a red cat"}
    if guidance > 1:
        kw["negative_prompt"] = "ugly"
    plain = pipe(generator=gen(), **kw).images
    expected = reference(pipe, embeds(pipe, "a red cat"), embeds(pipe, "blurry dog"))(generator=gen(), **kw).images
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-3
    remove_nag(pipe)
    assert type(pipe) is cls
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)


def test_batches_per_prompt_negatives_and_pre_encoded_negatives():
    pipe = sdxl_toy.pipeline()
    prompts, negatives = ["a red cat", "a blue dog"], ["blurry", "dark"]
    kw = {**COMMON, "latents": sdxl_toy.latents(4), "guidance_scale": 5.0, "num_images_per_prompt": 2}
    expected = reference(pipe, embeds(pipe, prompts, 2), embeds(pipe, negatives, 2))(prompts, **kw).images
    apply_nag(pipe, backend="torch")
    torch.testing.assert_close(pipe(prompts, nag_negative_prompt=negatives, **kw).images, expected,
                               rtol=0, atol=1e-10)
    out = pipe(prompts, nag_negative_prompt_embeds=embeds(pipe, negatives), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_bad_input_gets_clear_errors_and_the_pipeline_stays_usable():
    pipe = apply_nag(sdxl_toy.pipeline(), backend="torch")
    kw = {**COMMON, "latents": sdxl_toy.latents(1), "guidance_scale": 5.0}
    negative = embeds(pipe, "blurry")
    expected = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    bad = [
        (dict(nag_negative_prompt_embeds=negative[:, :5]), r"must have the per-row shape \(8, 64\)"),
        (dict(nag_negative_prompt_embeds=negative[..., :32]), r"must have the per-row shape \(8, 64\)"),
        (dict(nag_negative_prompt_embeds=negative.repeat(2, 1, 1)), "must have batch 1, 1 .* got 2"),
        (dict(nag_negative_prompt="blurry", nag_negative_prompt_embeds=negative), "give either"),
    ]
    for nag, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe("a red cat", **nag, **kw)
        assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None
    assert torch.equal(pipe("a red cat", nag_negative_prompt="blurry", **kw).images, expected)


def test_nag_end_and_model_cpu_offload():
    pipe = sdxl_toy.pipeline()
    kw = {**COMMON, "latents": sdxl_toy.latents(1), "guidance_scale": 5.0, "num_inference_steps": 3}
    positive, negative = embeds(pipe, "a red cat"), embeds(pipe, "blurry")
    full = reference(pipe, positive, negative)("a red cat", **kw).images
    expected = reference(pipe, positive, negative, nag_end=0.25)("a red cat", **kw).images
    assert (expected - full).abs().max() > 1e-5  # NAG is off in the later steps
    apply_nag(pipe, backend="torch", nag_end=0.25)
    torch.testing.assert_close(pipe("a red cat", nag_negative_prompt="blurry", **kw).images, expected,
                               rtol=0, atol=1e-10)
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe("a red cat", nag_negative_prompt="blurry", nag_end=1.0, **kw).images
        torch.testing.assert_close(out, full, rtol=0, atol=1e-10)
