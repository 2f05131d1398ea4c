"""apply_nag on Krea2Pipeline (the base checkpoint with CFG, the distilled turbo checkpoint without): NAG arguments,
CFG guiding only the conditional pass, nag_end, batches and num_images_per_prompt, pre-encoded negatives, calls
without NAG arguments stock, removal, bad input.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
float64 implementation of the 2B layout (``krea2_reference``) fed the NAG negative's embeds and mask from
``encode_prompt``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import Krea2Pipeline

import krea2_reference
import krea2_toy
from krea2_toy import float64_throughout  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread", "float64_throughout")

COMMON = dict(height=krea2_toy.SIZE, width=krea2_toy.SIZE, num_inference_steps=2,
              max_sequence_length=krea2_toy.SEQ_LEN, output_type="latent")


def encoded(pipe, prompt, images_per_prompt=1):
    return pipe.encode_prompt(prompt, num_images_per_prompt=images_per_prompt,
                              max_sequence_length=krea2_toy.SEQ_LEN)


def reference_forward(model, negative=None, uncond=None, calls=None, end=1.0, **nag):
    """A stand-in for ``model.forward``: the 2B layout with ``negative`` (embeds, mask) appended on conditional calls
    while NAG is on (``t >= (1 - end) * 1000``)."""

    def forward(hidden_states, encoder_hidden_states, timestep, position_ids, encoder_attention_mask=None,
                attention_kwargs=None, return_dict=True):
        text, mask = encoder_hidden_states, encoder_attention_mask
        conditional = uncond is None or not torch.equal(text, uncond)
        on = float(timestep[0]) * 1000 >= (1 - end) * 1000
        if negative is not None and conditional and on:
            text, mask = torch.cat([text, negative[0]]), torch.cat([mask, negative[1]])
        if calls is not None:
            calls.append(text.shape[0])
        out = krea2_reference.krea2_forward(model, hidden_states, text, timestep, position_ids, mask, **nag)
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


@pytest.mark.parametrize("guidance_scale", [0.0, 4.5], ids=["cfg-off", "cfg-on"])
def test_nag_negative_prompt_equals_the_2b_layout(guidance_scale):
    pipe = krea2_toy.pipeline()
    negative, uncond = encoded(pipe, "blurry dark"), encoded(pipe, "")
    kw = dict(prompt="a red fox", guidance_scale=guidance_scale, **COMMON)
    stock = pipe(generator=gen(), **kw).images  # the unpatched pipeline
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, uncond[0], calls), generator=gen(),
                             **kw)
    assert calls == ([2, 1, 2, 1] if guidance_scale else [2, 2])  # CFG's unconditional pass stays plain
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry dark", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert (out - stock).abs().max() > 1e-6
    assert torch.equal(pipe(generator=gen(), **kw).images, stock)  # no NAG arguments: the stock call
    # nag_scale alone: the empty NAG negative (as the authors' fallback)
    empty = run_reference(pipe, reference_forward(pipe.transformer, encoded(pipe, ""), uncond[0], nag_scale=3.0),
                          generator=gen(), **kw)
    torch.testing.assert_close(pipe(nag_scale=3.0, generator=gen(), **kw).images, empty, rtol=0, atol=1e-9)
    remove_nag(pipe)
    assert type(pipe) is Krea2Pipeline
    assert torch.equal(pipe(generator=gen(), **kw).images, stock)


def test_turbo_few_steps_nag_is_the_only_negative_prompt():
    pipe = krea2_toy.pipeline(distilled=True)  # is_distilled: the fixed shift mu = 1.15, no CFG
    negative = encoded(pipe, "blurry")
    kw = dict(prompt="a cat in the snow", guidance_scale=0.0, **{**COMMON, "num_inference_steps": 4})
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, nag_scale=5.0, nag_alpha=0.25,
                                                     nag_tau=2.5), generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_nag_end_turns_nag_off_for_the_late_steps():
    pipe = krea2_toy.pipeline()
    negative = encoded(pipe, "blurry")
    kw = dict(prompt="a dog", guidance_scale=0.0, **{**COMMON, "num_inference_steps": 4})
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, calls=calls, end=0.5),
                             generator=gen(), **kw)
    assert 2 in calls and 1 in calls  # guided early, plain late
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry", nag_end=0.5, generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_prompt_lists_images_per_prompt_pre_encoded_negatives_and_settings():
    pipe = krea2_toy.pipeline()
    prompts, negatives = ["a cat", "a blue sky"], ["blurry", "dark low quality"]
    negative = encoded(pipe, negatives, images_per_prompt=2)
    uncond = encoded(pipe, ["", ""], images_per_prompt=2)
    kw = dict(prompt=prompts, num_images_per_prompt=2, guidance_scale=3.0, **COMMON)
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, uncond[0], nag_scale=7.0,
                                                     nag_alpha=0.5), generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt=negatives, nag_scale=7.0, nag_alpha=0.5, generator=gen(), **kw).images
    assert out.shape[0] == 4
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    embeds, mask = encoded(pipe, negatives)  # one row per prompt
    pre = pipe(nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=mask, nag_scale=7.0, nag_alpha=0.5,
               generator=gen(), **kw).images
    torch.testing.assert_close(pre, expected, rtol=0, atol=1e-9)
    # one negative string for every prompt
    one = encoded(pipe, ["blurry", "blurry"], images_per_prompt=2)
    expected = run_reference(pipe, reference_forward(pipe.transformer, one, uncond[0]), generator=gen(), **kw)
    torch.testing.assert_close(pipe(nag_negative_prompt="blurry", generator=gen(), **kw).images, expected, rtol=0,
                               atol=1e-9)


def test_prompt_given_as_embeddings_with_a_text_nag_negative():
    pipe = krea2_toy.pipeline()
    prompt_embeds, prompt_mask = encoded(pipe, "a cat")
    negative = encoded(pipe, "blurry")
    kw = dict(prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_mask, guidance_scale=0.0, **COMMON)
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative), generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_bad_nag_arguments_are_refused_clearly():
    pipe = krea2_toy.pipeline()
    apply_nag(pipe, backend="torch")
    embeds, mask = encoded(pipe, "blurry")
    kw = dict(prompt="a cat", guidance_scale=0.0, **COMMON)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds and nag_negative_prompt_embeds_mask must be given"):
        pipe(nag_negative_prompt_embeds=embeds, **kw)
    with pytest.raises(ValueError, match="give either nag_negative_prompt or"):
        pipe(nag_negative_prompt="x", nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=mask, **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds must have the per-row shape"):
        pipe(nag_negative_prompt_embeds=embeds[:, :5], nag_negative_prompt_embeds_mask=mask[:, :5], **kw)
    with pytest.raises(TypeError, match="nag_negative_prompt must be a str or a non-empty list"):
        pipe(nag_negative_prompt=3, **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 1"):
        pipe(nag_negative_prompt=["a", "b"], **kw)
    with pytest.raises(ValueError, match="scale"):
        pipe(nag_negative_prompt="blurry", nag_scale=0.5, **kw)


@pytest.mark.parametrize("guidance_scale", [0.0, 4.5], ids=["cfg-off", "cfg-on"])
def test_negative_equal_to_the_prompt_and_scale_one_reproduce_the_stock_pipeline(guidance_scale):
    pipe = krea2_toy.pipeline()
    kw = dict(prompt=["a red fox", "a cat"], guidance_scale=guidance_scale, **COMMON)
    stock = pipe(generator=gen(), **kw).images
    apply_nag(pipe, backend="torch")
    same = pipe(nag_negative_prompt=["a red fox", "a cat"], generator=gen(), **kw).images
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
    assert torch.equal(pipe(nag_negative_prompt="blurry", nag_scale=1.0, generator=gen(), **kw).images, stock)
