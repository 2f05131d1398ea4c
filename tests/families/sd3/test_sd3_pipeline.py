"""apply_nag on stock SD3 pipelines: call-time NAG arguments, CFG (batched) guiding only the conditional rows,
guidance off (SD3.5 Turbo), batches, pre-encoded negatives, offloading, bad input.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
implementation of the authors' computation (``sd3_reference``) fed the NAG negative from ``encode_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

import sd3_reference
import sd3_toy
from nag_kernels.integrations import call_state
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=sd3_toy.SEQ_LEN, output_type="latent")


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (sd3_toy.SIZE, sd3_toy.SIZE, 3), dtype=np.uint8))


EXTRA = {
    StableDiffusion3Pipeline: {},
    StableDiffusion3Img2ImgPipeline: {"image": _image(1), "strength": 0.9},
    StableDiffusion3InpaintPipeline: {"image": _image(1), "mask_image": _image(2), "strength": 0.9},
}


def negative_embeds(pipe, negative, per_prompt=1):
    embeds, _, pooled, _ = pipe.encode_prompt(negative, None, None, num_images_per_prompt=per_prompt,
                                              do_classifier_free_guidance=False, max_sequence_length=sd3_toy.SEQ_LEN)
    return embeds, pooled


def reference_forward(model, negative=None, calls=None, **nag):
    """A stand-in for ``model.forward``: the authors' computation, the NAG negative appended for the conditional rows
    (all rows without CFG; the second half of the batched CFG rows with it)."""

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, joint_attention_kwargs=None,
                return_dict=True, **_):
        text, pooled = encoder_hidden_states, pooled_projections
        if negative is not None:
            text = torch.cat([text, negative[0]])
            pooled = torch.cat([pooled, negative[1]])
        if calls is not None:
            calls.append((hidden_states.shape[0], text.shape[0]))
        return (sd3_reference.sd3_forward(model, hidden_states, text, pooled, timestep, **nag),)

    return forward


def run_reference(pipe, forward, *args, **kwargs):
    pipe.transformer.forward = forward
    try:
        return pipe(*args, **kwargs).images
    finally:
        del pipe.transformer.forward


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls", list(EXTRA), ids=lambda c: c.__name__)
@pytest.mark.parametrize("cfg", [0.0, 4.0], ids=["no-cfg", "cfg"])
def test_every_sd3_pipeline_matches_the_authors_computation(cls, cfg):
    pipe = sd3_toy.pipeline(cls)
    kw = {**COMMON, **EXTRA[cls], "prompt": "a red cat", "guidance_scale": cfg}
    plain = pipe(generator=gen(), **kw).images
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry dog"), calls),
                             generator=gen(), **kw)
    assert calls[0] == ((2, 3) if cfg else (1, 2))  # CFG: latents [uncond; cond], text + the cond row's NAG row
    apply_nag(pipe, backend="torch")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[0], k["encoder_hidden_states"].shape[0])),
        with_kwargs=True)
    out = pipe(nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    handle.remove()
    assert seen == calls
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    remove_nag(pipe)
    assert type(pipe) is cls
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)


def test_off_and_neutral_calls_reproduce_the_unpatched_output():
    pipe = sd3_toy.pipeline(StableDiffusion3Pipeline)
    kw = {**COMMON, "latents": sd3_toy.latents(1), "guidance_scale": 4.0, "negative_prompt": "green"}
    stock = pipe("a red cat", **kw).images
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe("a red cat", **kw).images, stock)  # no NAG arguments: the stock call
    assert torch.equal(pipe("a red cat", nag_negative_prompt="dog", nag_scale=1.0, **kw).images, stock)
    same = pipe("a red cat", nag_negative_prompt="a red cat", **kw).images
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cfg", [0.0, 4.0], ids=["no-cfg", "cfg"])
def test_batches_per_prompt_negatives_and_embeds_equal_their_batch_one_runs(cfg):
    pipe = apply_nag(sd3_toy.pipeline(StableDiffusion3Pipeline), backend="torch")
    prompts, negatives = ["a red cat", "green trees"], ["blurry", "a dog"]
    latents = sd3_toy.latents(2)
    kw = {**COMMON, "guidance_scale": cfg}
    batch = pipe(prompts, nag_negative_prompt=negatives, latents=latents, **kw).images
    for i in range(2):
        one = pipe(prompts[i], nag_negative_prompt=negatives[i], latents=latents[i : i + 1], **kw).images
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-10)
    embeds, pooled = negative_embeds(pipe, "blurry")
    out = pipe(prompts, nag_negative_prompt_embeds=embeds, nag_negative_pooled_prompt_embeds=pooled,
               latents=latents, **kw).images
    expected = pipe(prompts, nag_negative_prompt="blurry", latents=latents, **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_nag_end_with_cfg_and_model_offload():
    pipe = sd3_toy.pipeline(StableDiffusion3Pipeline)
    kw = {**COMMON, "num_inference_steps": 4, "latents": sd3_toy.latents(1), "guidance_scale": 4.0}
    apply_nag(pipe, backend="torch")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True)
    out = pipe("a red cat", nag_negative_prompt="blurry", nag_end=0.5, **kw).images
    handle.remove()
    assert seen[0] == 3 and seen[-1] == 2  # NAG on early, then a plain batched CFG call
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        torch.testing.assert_close(pipe("a red cat", nag_negative_prompt="blurry", nag_end=0.5, **kw).images, out,
                                   rtol=0, atol=1e-12)


def test_bad_input_gets_clear_errors_and_the_pipeline_stays_usable():
    pipe = apply_nag(sd3_toy.pipeline(StableDiffusion3Pipeline), backend="torch")
    kw = {**COMMON, "latents": sd3_toy.latents(1), "guidance_scale": 0.0}
    expected = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    embeds, pooled = negative_embeds(pipe, "blurry")
    bad = [
        (dict(nag_negative_prompt_embeds=embeds[:, :5], nag_negative_pooled_prompt_embeds=pooled),
         r"nag_negative_prompt_embeds must have the per-row shape \(16, 32\)"),
        (dict(nag_negative_prompt_embeds=embeds), "must be given together"),
        (dict(nag_negative_prompt=["a", "b"]), "nag_negative_prompt must be one string or a list of 1 or 1"),
        (dict(nag_negative_prompt="blurry", nag_alpha=2.0), "nag_alpha"),
    ]
    for nag, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe("a red cat", **nag, **kw)
        assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None
    assert torch.equal(pipe("a red cat", nag_negative_prompt="blurry", **kw).images, expected)
