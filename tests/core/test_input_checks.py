"""The NAG-negative arguments are checked before anything runs, the same way on every family's pipeline.

- Each element of a ``nag_negative_prompt`` (``_2``, ``_3``) list must be a ``str``: the error names the argument
  and the index (``[None]`` used to reach the tokenizer, a NoneType deep in Wan's encoder, or be encoded as the text
  "None" by Qwen-Image).
- Pre-encoded embeddings must be floating point (an integer tensor used to be cast silently) and hold data: a
  meta-device tensor is refused (one on any real device is moved to the prompt's device and dtype, like the stock
  pipelines' ``prompt_embeds``).
- Qwen-Image: ``nag_negative_prompt_embeds`` may come without ``nag_negative_prompt_embeds_mask`` (``None``, what its
  ``encode_prompt`` returns when every token counts), and prompt lists with ``num_images_per_prompt > 1`` work.

After each refusal the pipeline is left as it was (``encode_prompt`` not wrapped, no call state) and still works.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, ZImagePipeline

import flux_toy
import qwenimage_toy
import sd3_toy
import sdxl_toy
import wan_toy
import zimage_toy
from nag_kernels.integrations import apply_nag, call_state

pytestmark = pytest.mark.usefixtures("single_thread")


def _flux():
    pipe = flux_toy.pipeline(FluxPipeline)
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=flux_toy.SEQ_LEN, output_type="latent",
              guidance_scale=0.0)
    embeds, pooled, _ = pipe.encode_prompt("blurry", None, max_sequence_length=flux_toy.SEQ_LEN)
    return pipe, kw, {"nag_negative_prompt_embeds": embeds, "nag_negative_pooled_prompt_embeds": pooled}


def _wan():
    pipe = wan_toy.pipeline()
    kw = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES, num_inference_steps=1,
              max_sequence_length=wan_toy.SEQ_LEN, output_type="latent", guidance_scale=1.0)
    embeds = pipe.encode_prompt("blurry", do_classifier_free_guidance=False, max_sequence_length=wan_toy.SEQ_LEN)[0]
    return pipe, kw, {"nag_negative_prompt_embeds": embeds}


def _sdxl():
    pipe = sdxl_toy.pipeline()
    kw = dict(height=sdxl_toy.SIZE, width=sdxl_toy.SIZE, num_inference_steps=1, output_type="latent",
              guidance_scale=5.0)
    embeds = pipe.encode_prompt("blurry", do_classifier_free_guidance=False)[0]
    return pipe, kw, {"nag_negative_prompt_embeds": embeds}


def _sd3():
    pipe = sd3_toy.pipeline(StableDiffusion3Pipeline)
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=sd3_toy.SEQ_LEN, output_type="latent",
              guidance_scale=4.0)
    embeds, _, pooled, _ = pipe.encode_prompt("blurry", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=sd3_toy.SEQ_LEN)
    return pipe, kw, {"nag_negative_prompt_embeds": embeds, "nag_negative_pooled_prompt_embeds": pooled}


def _qwen():
    pipe = qwenimage_toy.pipeline(QwenImagePipeline)
    kw = dict(height=32, width=32, num_inference_steps=1, output_type="latent")
    embeds, _ = pipe.encode_prompt("blurry")
    return pipe, kw, {"nag_negative_prompt_embeds": embeds,
                      "nag_negative_prompt_embeds_mask": torch.ones(embeds.shape[:2], dtype=torch.long)}


def _zimage():
    pipe = zimage_toy.pipeline(ZImagePipeline)
    kw = dict(height=zimage_toy.SIZE, width=zimage_toy.SIZE, num_inference_steps=1, max_sequence_length=64,
              output_type="latent")
    embeds, _ = pipe.encode_prompt("blurry", do_classifier_free_guidance=False, max_sequence_length=64)
    return pipe, kw, {"nag_negative_prompt_embeds": embeds}  # a list of [L, D] tensors, one per prompt


PIPELINES = {"flux": _flux, "wan": _wan, "sdxl": _sdxl, "sd3": _sd3, "qwenimage": _qwen, "zimage": _zimage}
SECOND_PROMPT = {"flux": "nag_negative_prompt_2", "sdxl": "nag_negative_prompt_2", "sd3": "nag_negative_prompt_3"}


def run(pipe, *args, **kwargs):
    """The pipeline's output tensor, from fixed noise."""
    out = pipe(*args, generator=torch.Generator().manual_seed(0), **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def _refused(pipe, error, match, *args, **kwargs):
    with pytest.raises(error, match=match):
        pipe(*args, **kwargs)
    assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None


def _with(embeds: dict, name: str, change) -> dict:
    """``embeds`` with the first tensor of ``name`` (a tensor, or Z-Image's list) replaced by ``change(tensor)``."""
    value = embeds[name]
    if isinstance(value, list):
        return {**embeds, name: [change(value[0]), *value[1:]]}
    return {**embeds, name: change(value)}


@pytest.mark.parametrize("family", list(PIPELINES))
def test_bad_negatives_are_refused_naming_the_argument_and_the_pipeline_stays_usable(family):
    pipe, kw, embeds = PIPELINES[family]()
    apply_nag(pipe, backend="torch")
    expected = run(pipe, "a red cat", nag_negative_prompt="blurry", **kw)
    where = "nag_negative_prompt_embeds[0]" if family == "zimage" else "nag_negative_prompt_embeds"

    _refused(pipe, TypeError, r"nag_negative_prompt\[0\] must be a str, got NoneType", "a red cat",
             nag_negative_prompt=[None], **kw)
    _refused(pipe, TypeError, r"nag_negative_prompt\[1\] must be a str, got int", ["a red cat", "a dog"],
             nag_negative_prompt=["blurry", 3], **kw)
    if family in SECOND_PROMPT:
        name = SECOND_PROMPT[family]
        _refused(pipe, TypeError, rf"{name}\[0\] must be a str, got NoneType", "a red cat",
                 nag_negative_prompt="blurry", **{name: [None]}, **kw)
    integer = _with(embeds, "nag_negative_prompt_embeds", lambda x: x.to(torch.int64))
    _refused(pipe, TypeError, re.escape(where) + " must be a floating-point tensor .*int64", "a red cat", **integer,
             **kw)
    meta = _with(embeds, "nag_negative_prompt_embeds", lambda x: torch.empty_like(x, device="meta"))
    _refused(pipe, ValueError, re.escape(where) + " is on the meta device", "a red cat", **meta, **kw)

    # a floating tensor of another precision is cast, as the stock pipelines cast prompt_embeds
    single = _with(embeds, "nag_negative_prompt_embeds", lambda x: x.to(torch.float32))
    torch.testing.assert_close(run(pipe, "a red cat", **single, **kw), expected, rtol=0, atol=1e-4)
    assert torch.equal(run(pipe, "a red cat", nag_negative_prompt="blurry", **kw), expected)


@pytest.mark.parametrize("family", ["qwenimage", "sdxl"])
def test_a_mask_dtype_is_free_but_a_meta_mask_or_a_complex_embedding_is_not(family):
    pipe, kw, embeds = PIPELINES[family]()
    apply_nag(pipe, backend="torch")
    complex_ = _with(embeds, "nag_negative_prompt_embeds", lambda x: x.to(torch.complex128))
    _refused(pipe, TypeError, "nag_negative_prompt_embeds must be a floating-point tensor", "a red cat",
             **complex_, **kw)
    if family == "qwenimage":
        bool_mask = _with(embeds, "nag_negative_prompt_embeds_mask", lambda m: m.to(torch.bool))
        run(pipe, "a red cat", **bool_mask, **kw)
        meta = _with(embeds, "nag_negative_prompt_embeds_mask", lambda m: torch.empty_like(m, device="meta"))
        _refused(pipe, ValueError, "nag_negative_prompt_embeds_mask is on the meta device", "a red cat", **meta, **kw)


def test_qwenimage_takes_the_embeds_without_a_mask_as_its_encode_prompt_returns_them():
    pipe, kw, _ = _qwen()
    apply_nag(pipe, backend="torch")
    latents = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    embeds, mask = pipe.encode_prompt("blurry")
    assert mask is None  # every token counts
    expected = pipe("a red cat", nag_negative_prompt="blurry", latents=latents, **kw).images
    out = pipe("a red cat", nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=None, latents=latents,
               **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out = pipe("a red cat", nag_negative_prompt_embeds=embeds, latents=latents, **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # a mask alone is still refused
    _refused(pipe, ValueError, "nag_negative_prompt_embeds must be given together", "a red cat",
             nag_negative_prompt_embeds_mask=torch.ones(1, embeds.shape[1], dtype=torch.long), **kw)


def test_qwenimage_prompt_lists_with_several_images_per_prompt():
    pipe, kw, _ = _qwen()
    kw = {**kw, "num_inference_steps": 2}
    # prompts (and negatives) of one token length: with padded prompts the stock pipeline's own rows differ from its
    # single-prompt runs (diffusers 0.42 repeats the text mask in prompt order, the embeddings per image)
    prompts, negatives = ["a red cat", "a big dog"], ["blurry", "a dog!"]
    latents = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stock = pipe(prompts, num_images_per_prompt=2, latents=latents, **kw).images
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe(prompts, num_images_per_prompt=2, latents=latents, **kw).images, stock)
    batch = pipe(prompts, nag_negative_prompt=negatives, num_images_per_prompt=2, latents=latents, **kw).images
    assert batch.shape == stock.shape
    for i in range(4):
        one = pipe(prompts[i // 2], nag_negative_prompt=negatives[i // 2], latents=latents[i : i + 1], **kw).images
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-10)
