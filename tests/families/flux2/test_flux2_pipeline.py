"""apply_nag on stock FLUX.2 [klein] pipelines: NAG arguments, batches, CFG guiding only the conditional pass,
reference images, the KV pipeline's refusal.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
float64 implementation of the 2B layout (``flux2_reference``) fed the NAG negative's embeds from ``encode_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline, Flux2KleinKVPipeline, Flux2KleinPipeline

import flux2_reference
import flux2_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(
    height=32, width=32, num_inference_steps=2, max_sequence_length=flux2_toy.SEQ_LEN,
    text_encoder_out_layers=flux2_toy.LAYERS, output_type="latent",
)


def _image(seed, size=64):  # FLUX.2's image processor takes 64 px and more
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def negative_embeds(pipe, negative, images_per_prompt=1):
    embeds, _ = pipe.encode_prompt(
        negative, num_images_per_prompt=images_per_prompt, max_sequence_length=flux2_toy.SEQ_LEN,
        text_encoder_out_layers=flux2_toy.LAYERS,
    )
    return embeds


def reference_forward(model, negative=None, uncond=None, calls=None, **nag):
    """A stand-in for ``model.forward``: the 2B layout with ``negative`` appended on conditional calls."""

    def forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None,
                joint_attention_kwargs=None, return_dict=True, **_):
        text = encoder_hidden_states
        conditional = uncond is None or not torch.equal(text, uncond)
        if negative is not None and conditional:
            text = torch.cat([text, negative])
        if calls is not None:
            calls.append(text.shape[0])
        return (flux2_reference.flux2_forward(model, hidden_states, text, timestep, img_ids, txt_ids, guidance, **nag),)

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
    (Flux2KleinPipeline, {}),
    (Flux2KleinPipeline, {"image": _image(1)}),  # reference-image tokens are image tokens
    (Flux2KleinInpaintPipeline, {"image": _image(1), "mask_image": _image(2), "strength": 0.9}),
], ids=["klein", "klein-reference-image", "klein-inpaint"])
def test_klein_with_a_nag_negative_prompt_equals_the_2b_layout(cls, extra):
    pipe = flux2_toy.klein(cls)
    negative = negative_embeds(pipe, "blurry")
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, calls=calls),
                             prompt="a cat", generator=gen(), **COMMON, **extra)
    assert calls == [2, 2]
    plain = run_reference(pipe, reference_forward(pipe.transformer), prompt="a cat", generator=gen(), **COMMON, **extra)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt="a cat", nag_negative_prompt="blurry", generator=gen(), **COMMON, **extra).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert (out - plain).abs().max() > 1e-6
    stock = pipe(prompt="a cat", generator=gen(), **COMMON, **extra).images  # no NAG arguments: the stock call
    torch.testing.assert_close(stock, plain, rtol=0, atol=1e-12)
    remove_nag(pipe)
    assert type(pipe) is cls


def test_prompt_lists_images_per_prompt_and_settings():
    pipe = flux2_toy.klein()
    negative = negative_embeds(pipe, ["blurry", "dark"], images_per_prompt=2)
    expected = run_reference(
        pipe, reference_forward(pipe.transformer, negative, nag_scale=7.0, nag_alpha=0.5),
        prompt=["a cat", "a dog"], num_images_per_prompt=2, generator=gen(), **COMMON,
    )
    apply_nag(pipe, backend="torch")
    out = pipe(prompt=["a cat", "a dog"], num_images_per_prompt=2, nag_negative_prompt=["blurry", "dark"],
               nag_scale=7.0, nag_alpha=0.5, generator=gen(), **COMMON).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    pre = pipe(prompt=["a cat", "a dog"], num_images_per_prompt=2, nag_negative_prompt_embeds=negative[::2],
               nag_scale=7.0, nag_alpha=0.5, generator=gen(), **COMMON).images  # one row per prompt
    torch.testing.assert_close(pre, expected, rtol=0, atol=1e-9)


def test_cfg_guides_only_the_conditional_pass():
    pipe = flux2_toy.klein(distilled=False)  # Klein base: CFG against the empty prompt
    negative = negative_embeds(pipe, "blurry")
    uncond = negative_embeds(pipe, "")
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, uncond=uncond, calls=calls),
                             prompt="a cat", guidance_scale=4.0, generator=gen(), **COMMON)
    assert calls == [2, 1, 2, 1]
    apply_nag(pipe, backend="torch")
    out = pipe(prompt="a cat", guidance_scale=4.0, nag_negative_prompt="blurry", generator=gen(), **COMMON).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_kv_pipeline_is_refused_clearly():
    tok = flux2_toy.tokenizer()
    pipe = Flux2KleinKVPipeline(
        scheduler=flux2_toy.FlowMatchEulerDiscreteScheduler(), vae=flux2_toy.vae(),
        text_encoder=flux2_toy.text_encoder(len(tok)), tokenizer=tok, transformer=flux2_toy.transformer(),
    )
    with pytest.raises(TypeError, match="Flux2KleinKVPipeline"):
        apply_nag(pipe)
    apply_nag(pipe.transformer)  # the model alone: its guided calls name the KV processors
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(2, 8, flux2_toy.TEXT_DIM),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(8, 4))
    with pytest.raises(NotImplementedError, match="Flux2KVAttnProcessor"):
        pipe.transformer(**kw)


def test_flux2_dev_pipeline_with_pre_encoded_prompts():
    # FLUX.2 [dev]'s Mistral text encoder is not built here: prompt and NAG negative are passed pre-encoded.
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_toy.vae(), text_encoder=None,
                         tokenizer=None, transformer=flux2_toy.transformer(guidance=True)).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, flux2_toy.SEQ_LEN, flux2_toy.TEXT_DIM, generator=g, dtype=torch.float64)
    negative = torch.randn(1, flux2_toy.SEQ_LEN, flux2_toy.TEXT_DIM, generator=g, dtype=torch.float64)
    kw = {**COMMON, "guidance_scale": 4.0}
    kw.pop("text_encoder_out_layers")
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative), prompt_embeds=prompt,
                             generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt_embeds=prompt, nag_negative_prompt_embeds=negative, generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds must have the per-row shape"):
        pipe(prompt_embeds=prompt, nag_negative_prompt_embeds=negative[:, :5], generator=gen(), **kw)


def test_flux2_dev_pipeline_with_text_prompts_and_caption_upsampling():
    # FLUX.2 [dev]'s Mistral encoder and its caption upsampling are stood in for by deterministic functions of the
    # text; the upsampled prompt's encoding is the guided one.
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_toy.vae(), text_encoder=None,
                         tokenizer=None, transformer=flux2_toy.transformer(guidance=True)).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)

    def embed(text):
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        return torch.randn(1, flux2_toy.SEQ_LEN, flux2_toy.TEXT_DIM, generator=g, dtype=torch.float64)

    pipe._get_mistral_3_small_prompt_embeds = lambda prompt, **_: torch.cat([embed(p) for p in prompt])
    pipe.upsample_prompt = lambda prompt, **_: [p + ", detailed" for p in ([prompt] if isinstance(prompt, str) else
                                                                        prompt)]
    kw = {**COMMON, "guidance_scale": 4.0}
    kw.pop("text_encoder_out_layers")
    expected = run_reference(pipe, reference_forward(pipe.transformer, embed("blurry")),
                             prompt_embeds=embed("a cat, detailed"), generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt="a cat", caption_upsample_temperature=0.7, nag_negative_prompt="blurry", generator=gen(),
               **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
