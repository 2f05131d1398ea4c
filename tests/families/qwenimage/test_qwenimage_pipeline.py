"""apply_nag on the stock QwenImagePipeline: NAG arguments, prompts of different lengths (padded and masked), true CFG
guiding only the conditional call, batches, removal.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
computation (``qwenimage_toy.qwen_forward``) fed the NAG negative from ``encode_prompt``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline

import qwenimage_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, output_type="latent")


def with_mask(embeds, mask):
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask


def joined(first, second):
    """Two (embeds, mask) pairs padded with masked zeros to a common length, rows stacked."""
    length = max(first[0].shape[1], second[0].shape[1])
    parts = [(torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])),
              torch.nn.functional.pad(m, (0, length - m.shape[1]))) for e, m in (first, second)]
    return torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])


def reference_forward(model, negative=None, uncond=None, calls=None):
    def forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask=None, img_shapes=None,
                return_dict=True, **_):
        text, mask = with_mask(encoder_hidden_states, encoder_hidden_states_mask)
        conditional = uncond is None or text.shape != uncond.shape or not torch.equal(text, uncond)
        if negative is not None and conditional:
            text, mask = joined((text, mask), with_mask(*negative))
        if calls is not None:
            calls.append(text.shape[0])
        return (qwenimage_toy.qwen_forward(model, hidden_states, text, mask, timestep, img_shapes),)

    return forward


def run_reference(pipe, forward, *args, **kwargs):
    pipe.transformer.forward = forward
    try:
        return pipe(*args, **kwargs).images
    finally:
        del pipe.transformer.forward


def test_nag_with_and_without_true_cfg_matches_the_independent_computation():
    pipe = qwenimage_toy.pipeline(QwenImagePipeline)
    negative = pipe.encode_prompt("blurry, ugly and watermarked")  # longer than the prompt: padded and masked
    prompt = "a red cat"
    for extra in ({"true_cfg_scale": 1.0}, {"true_cfg_scale": 3.0, "negative_prompt": "trees"}):
        kw = {**COMMON, "latents": None, "generator": torch.Generator().manual_seed(0), **extra}
        plain = pipe(prompt, **kw).images
        uncond = pipe.encode_prompt("trees")[0] if "negative_prompt" in extra else None
        calls = []
        kw["generator"] = torch.Generator().manual_seed(0)
        expected = run_reference(pipe, reference_forward(pipe.transformer, negative, uncond, calls), prompt, **kw)
        assert calls == ([2, 2] if uncond is None else [2, 1, 2, 1])
        apply_nag(pipe, backend="torch")
        kw["generator"] = torch.Generator().manual_seed(0)
        out = pipe(prompt, nag_negative_prompt="blurry, ugly and watermarked", **kw).images
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-5
        remove_nag(pipe)
        kw["generator"] = torch.Generator().manual_seed(0)
        assert torch.equal(pipe(prompt, **kw).images, plain)


def test_batches_and_pre_encoded_negatives_equal_their_batch_one_runs():
    pipe = apply_nag(qwenimage_toy.pipeline(QwenImagePipeline), backend="torch")
    prompts, negatives = ["a red cat", "green trees in the rain"], ["blurry", "a dog"]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    batch = pipe(prompts, nag_negative_prompt=negatives, latents=latents, **COMMON).images
    for i in range(2):
        one = pipe(prompts[i], nag_negative_prompt=negatives[i], latents=latents[i : i + 1], **COMMON).images
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-10)
    embeds, mask = with_mask(*pipe.encode_prompt("blurry"))
    out = pipe(prompts, nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=mask, latents=latents,
               **COMMON).images
    torch.testing.assert_close(out, pipe(prompts, nag_negative_prompt="blurry", latents=latents, **COMMON).images,
                               rtol=0, atol=1e-12)


def _image(seed):
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"])
def test_img2img_and_inpaint_match_the_independent_computation(name):
    import diffusers

    cls = getattr(diffusers, name)
    pipe = qwenimage_toy.pipeline(cls)
    extra = {"image": _image(1), "strength": 0.9, **({"mask_image": _image(2)} if "Inpaint" in name else {})}
    kw = {**COMMON, **extra, "true_cfg_scale": 1.0}
    calls = []
    forward = reference_forward(pipe.transformer, pipe.encode_prompt("blurry"), None, calls)
    expected = run_reference(pipe, forward, "a red cat", generator=torch.Generator().manual_seed(0), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert calls and set(calls) == {2}
