"""apply_nag on the stock QwenImage21Pipeline (Qwen-Image 2.1 and the Turbo setting): NAG arguments, a NAG negative
longer than the prompt (both padded to a common length, the prompt's vision layout with them), condition images, true
CFG guiding only the conditional call, nag_end, the KV cache on and off, prompt batches and num_images_per_prompt,
pre-encoded negatives, model CPU offload, stock equivalence, removal and errors.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
computation (``qwenimage21_reference.qwenimage21_forward``, the whole sequence recomputed at every step, no KV cache)
fed the NAG negative from the pipeline's ``encode_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import qwenimage21_toy as toy  # first: it skips this module on a diffusers without Qwen-Image 2.1
import qwenimage21_reference
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64  # pixels: 4 x 4 target latent tokens (16x VAE), 4 vision slots
COMMON = dict(height=SIZE, width=SIZE, output_resolution=SIZE, num_inference_steps=3, output_type="latent")
PROMPT = "a red cat on a wooden chair by the window"
NEGATIVE = "blurry, ugly"  # shorter than the prompt: padded and masked to the prompt's length


@pytest.fixture(scope="module")
def pipe():
    return toy.pipeline()


def gen():
    return torch.Generator().manual_seed(0)


def image(seed=1):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def resized(pipe, img):
    """The condition image as the pipeline hands it to encode_prompt (RGBA, resized to the output resolution)."""
    return pipe.image_processor.resize(img.convert("RGBA"), width=SIZE, height=SIZE)


def with_mask(embeds, mask):
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask.to(torch.long)


def fitted(negative, length):
    """The NAG negative ``(embeds, mask)`` fitted to the prompt's length: padded with masked zeros, or cut."""
    embeds, mask = with_mask(*negative[:2])
    pad = max(0, length - embeds.shape[1])
    return (torch.nn.functional.pad(embeds[:, :length], (0, 0, 0, pad)),
            torch.nn.functional.pad(mask[:, :length], (0, pad)))


def reference_forward(model, negative=None, uncond=None, calls=None, end=1.0):
    """The transformer's forward as the definition: a conditional call (not the true-CFG negative ``uncond``) at a
    step where NAG acts (``t >= (1 - end) * 1000``) gets the NAG negative's rows, fitted to the prompt's layout (its
    length and vision slots, ``img_mask`` as the pipeline built it for the prompt)."""

    def forward(hidden_states, timestep, encoder_hidden_states, img_shapes, img_mask, encoder_hidden_states_mask=None,
                return_dict=True, **_):
        text, mask = with_mask(encoder_hidden_states, encoder_hidden_states_mask)
        conditional = uncond is None or text.shape != uncond.shape or not torch.equal(text, uncond)
        if negative is not None and conditional and float(timestep[0]) * 1000 >= (1 - end) * 1000:
            n_text, n_mask = fitted(negative, text.shape[1])
            text, mask = torch.cat([text, n_text]), torch.cat([mask, n_mask])
        if calls is not None:
            calls.append(text.shape[0])
        with torch.no_grad():
            out = qwenimage21_reference.qwenimage21_forward(model, hidden_states, text, timestep, img_shapes,
                                                            img_mask, mask)
        return (out,)

    return forward


def run_reference(pipe, forward, *args, **kwargs):
    pipe.transformer.forward = forward
    try:
        return pipe(*args, **kwargs).images
    finally:
        del pipe.transformer.forward


def close(actual, expected, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("cfg", [False, True], ids=["cfg-off", "cfg-on"])
def test_nag_with_and_without_true_cfg_matches_the_definition(pipe, cfg, cache):
    extra = {"true_cfg_scale": 3.0, "negative_prompt": "trees"} if cfg else {}
    kw = {**COMMON, **extra, "use_kv_cache": cache}
    plain = pipe(PROMPT, generator=gen(), **kw).images
    uncond = pipe.encode_prompt("trees")[0] if cfg else None
    calls = []
    forward = reference_forward(pipe.transformer, pipe.encode_prompt(NEGATIVE), uncond, calls)
    expected = run_reference(pipe, forward, PROMPT, generator=gen(), **kw)
    assert calls == ([2, 1] * 3 if cfg else [2] * 3)
    apply_nag(pipe, backend="torch")
    try:
        out = pipe(PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).images
        close(out, expected)
        assert (out - plain).abs().max() > 1e-5
    finally:
        remove_nag(pipe)
    assert torch.equal(pipe(PROMPT, generator=gen(), **kw).images, plain)


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-cache"])
def test_condition_image_and_nag_end(pipe, cache):
    img = image()
    kw = {**COMMON, "image": img, "use_kv_cache": cache}
    negative = pipe.encode_prompt(NEGATIVE, image=[resized(pipe, img)])
    assert negative[2].any()  # the negative has the condition image's vision slots, at the prompt's positions
    expected = {end: run_reference(pipe, reference_forward(pipe.transformer, negative, end=end), PROMPT,
                                   generator=gen(), **kw) for end in (1.0, 0.5)}
    apply_nag(pipe, backend="torch")
    try:
        for end in (1.0, 0.5):  # 0.5: NAG on the first step(s) only, then plain steps on the positive half of the cache
            out = pipe(PROMPT, nag_negative_prompt=NEGATIVE, nag_end=end, generator=gen(), **kw).images
            close(out, expected[end])
        assert (expected[1.0] - expected[0.5]).abs().max() > 1e-6
    finally:
        remove_nag(pipe)


def test_prompt_batches_and_num_images_per_prompt(pipe):
    prompts, negatives = [PROMPT, "green trees in the rain"], ["blurry", "a dog with a very long tail"]
    kw = {**COMMON, "num_images_per_prompt": 2}
    negative = pipe.encode_prompt(negatives, num_images_per_prompt=2)
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative), prompts, generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    try:
        out = pipe(prompts, nag_negative_prompt=negatives, generator=gen(), **kw).images
        assert out.shape[0] == 4
        close(out, expected)
        one = pipe(prompts, nag_negative_prompt="blurry", generator=gen(), **kw).images  # one string for every prompt
        blurry = pipe.encode_prompt(["blurry"] * 2, num_images_per_prompt=2)
        close(one, run_reference(pipe, reference_forward(pipe.transformer, blurry), prompts, generator=gen(), **kw))
    finally:
        remove_nag(pipe)


def test_a_negative_longer_than_the_prompt_is_cut_to_the_prompt_layout(pipe):
    long = "blurry, ugly, watermarked, low quality, deformed hands, extra fingers"
    negative = pipe.encode_prompt(long)
    prompt_len = pipe.encode_prompt("a cat")[0].shape[1]
    assert negative[0].shape[1] > prompt_len
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative), "a cat", generator=gen(), **COMMON)
    apply_nag(pipe, backend="torch")
    try:
        with pytest.warns(UserWarning, match=f"the NAG negative has {negative[0].shape[1]} tokens, more than the "
                                             f"prompt's {prompt_len}"):
            out = pipe("a cat", nag_negative_prompt=long, generator=gen(), **COMMON).images
        close(out, expected)
    finally:
        remove_nag(pipe)


def test_pre_encoded_negatives_equal_the_text_path(pipe):
    apply_nag(pipe, backend="torch")
    try:
        text = pipe(PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **COMMON).images
        embeds, mask, _ = pipe.encode_prompt(NEGATIVE)
        out = pipe(PROMPT, nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=mask,
                   generator=gen(), **COMMON).images
        close(out, text, atol=0)
        out = pipe(PROMPT, nag_negative_prompt_embeds=embeds, generator=gen(), **COMMON).images  # mask None
        close(out, text, atol=0)
    finally:
        remove_nag(pipe)


def test_turbo_setting_nag_is_the_only_negative():
    turbo = toy.pipeline(sample_sigmas=[1.0, 0.6, 0.3])  # the Turbo checkpoint ships its sampling grid like this
    kw = {**COMMON, "num_inference_steps": None}
    calls = []
    expected = run_reference(turbo, reference_forward(turbo.transformer, turbo.encode_prompt(NEGATIVE), calls=calls),
                             PROMPT, generator=gen(), **kw)
    assert calls == [2] * 3
    apply_nag(turbo, backend="torch")
    close(turbo(PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).images, expected)


def test_stock_calls_and_bad_arguments(pipe):
    plain = pipe(PROMPT, generator=gen(), **COMMON).images
    apply_nag(pipe, backend="torch")
    try:
        assert torch.equal(pipe(PROMPT, generator=gen(), **COMMON).images, plain)
        assert torch.equal(pipe(PROMPT, nag_negative_prompt="dog", nag_scale=1.0, generator=gen(),
                                **COMMON).images, plain)
        with pytest.raises(TypeError, match="nag_negative_prompt must be a str or a non-empty list of str"):
            pipe(PROMPT, nag_negative_prompt=3, **COMMON)
        with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 2"):
            pipe(["a", "b"], nag_negative_prompt=["x", "y", "z"], **COMMON)
        embeds, mask, _ = pipe.encode_prompt(NEGATIVE)
        with pytest.raises(ValueError, match="nag_negative_prompt_embeds cannot be combined with condition images"):
            pipe(PROMPT, image=image(), nag_negative_prompt_embeds=embeds, **COMMON)
        with pytest.raises(ValueError, match="nag_negative_prompt_embeds must be \\[rows, tokens, 32\\]"):
            pipe(PROMPT, nag_negative_prompt_embeds=embeds[..., :16], **COMMON)
        with pytest.raises(ValueError, match="nag_negative_prompt_embeds_mask must have shape"):
            pipe(PROMPT, nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=torch.ones(1, 3),
                 **COMMON)
        with pytest.raises(ValueError, match="nag_scale must be >= 1"):
            pipe(PROMPT, nag_negative_prompt="dog", nag_scale=0.5, **COMMON)
    finally:
        remove_nag(pipe)


def test_model_cpu_offload_through_pipeline_calls():
    pipe = toy.pipeline()
    kw = {**COMMON, "image": image()}
    negative = pipe.encode_prompt(NEGATIVE, image=[resized(pipe, kw["image"])])
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative), PROMPT, generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the offload hooks are rebuilt after every call
        close(pipe(PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).images, expected)
