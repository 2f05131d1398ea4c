"""apply_nag on SanaPipeline, SanaControlNetPipeline, SanaSprintPipeline and SanaSprintImg2ImgPipeline: NAG arguments
with and without (batched) CFG, nag_end < 1, prompt batches and num_images_per_prompt, pre-encoded negatives, calls
without NAG arguments and remove_nag, against the independent float64 definition (``sana_reference``).

Expected outputs come from the stock pipeline on the same components whose transformer (and ControlNet) forward is
replaced by the reference with the NAG negative's rows appended to every call where NAG is on. The negative is
encoded by the pipeline's own CFG path (``encode_prompt(..., negative_prompt=...)``: no complex human instruction);
Sana-Sprint has no CFG path and encodes it as a prompt without the instruction.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import SanaControlNetPipeline, SanaPipeline, SanaSprintImg2ImgPipeline, SanaSprintPipeline

import sana_reference
import sana_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=sana_toy.SIZE, width=sana_toy.SIZE, num_inference_steps=2, max_sequence_length=sana_toy.SEQ_LEN,
              output_type="latent", use_resolution_binning=False)
ATOL = 1e-6  # the float32 linear attention, over 2 steps


def gen():
    return torch.Generator().manual_seed(0)


def negative(pipe, prompts, negatives, per_image=1):
    """The NAG negative's embeddings and mask, encoded as the pipeline encodes its own negative prompt."""
    per = "num_videos_per_prompt" if "num_videos_per_prompt" in inspect.signature(pipe.encode_prompt).parameters \
        else "num_images_per_prompt"
    with torch.no_grad():
        if isinstance(pipe, (SanaSprintPipeline, SanaSprintImg2ImgPipeline)):
            return pipe.encode_prompt(negatives, complex_human_instruction=None, max_sequence_length=sana_toy.SEQ_LEN,
                                      **{per: per_image})
        out = pipe.encode_prompt(prompts, True, negative_prompt=negatives, max_sequence_length=sana_toy.SEQ_LEN,
                                 **{per: per_image})
    return out[2], out[3]


def _on(timestep, end, scale):
    return float(timestep.max()) * scale >= (1 - end) * 1000


def reference_forward(model, neg, settings, calls, timestep_scale=1.0):
    """The transformer's forward: the reference with ``neg`` appended where NAG is on (``settings``: scale, tau,
    alpha, end)."""
    embeds, mask = neg
    end = settings.get("end", 1.0)
    nag = {k: settings[k] for k in ("scale", "tau", "alpha")}

    def forward(hidden_states, encoder_hidden_states, timestep, guidance=None, encoder_attention_mask=None,
                attention_mask=None, attention_kwargs=None, controlnet_block_samples=None, return_dict=True):
        on = _on(timestep, end, timestep_scale)
        calls.append(on)
        text, text_mask = encoder_hidden_states, encoder_attention_mask
        if on:
            text = torch.cat([text, embeds.to(text.dtype)])
            text_mask = torch.cat([text_mask, mask.to(text_mask.dtype)])
        with torch.no_grad():
            out = sana_reference.sana_forward(model, hidden_states, text, timestep, text_mask, guidance,
                                              controlnet_block_samples, **nag)
        return (out,)

    return forward


def controlnet_reference_forward(controlnet, neg, settings):
    embeds, mask = neg
    nag = {k: settings[k] for k in ("scale", "tau", "alpha")}

    def forward(hidden_states, encoder_hidden_states, timestep, controlnet_cond, conditioning_scale=1.0,
                encoder_attention_mask=None, attention_mask=None, attention_kwargs=None, return_dict=True):
        text = torch.cat([encoder_hidden_states, embeds.to(encoder_hidden_states.dtype)])
        text_mask = torch.cat([encoder_attention_mask, mask.to(encoder_attention_mask.dtype)])
        with torch.no_grad():
            return (sana_reference.sana_controlnet_forward(controlnet, hidden_states, text, timestep, controlnet_cond,
                                                           conditioning_scale, text_mask, **nag),)

    return forward


def expected_images(pipe, neg, settings, call, timestep_scale=1.0):
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, neg, settings, calls, timestep_scale)
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        controlnet.forward = controlnet_reference_forward(controlnet, neg, settings)
    try:
        return call(), calls
    finally:
        del pipe.transformer.forward
        if controlnet is not None:
            del controlnet.forward


RECOMMENDED = {"scale": 5.0, "tau": 2.5, "alpha": 0.25}


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["nag-only", "cfg"])
def test_sana_pipeline_matches_the_definition(guidance):
    pipe = sana_toy.pipeline(SanaPipeline)
    kw = {**COMMON, "guidance_scale": guidance, "negative_prompt": "ugly"}
    plain = pipe("a red cat", generator=gen(), **kw).images
    neg = negative(pipe, "a red cat", "dog")
    assert not torch.equal(neg[1], pipe.encode_prompt("a red cat", False, max_sequence_length=sana_toy.SEQ_LEN)[1])
    expected, calls = expected_images(pipe, neg, RECOMMENDED,
                                      lambda: pipe("a red cat", generator=gen(), **kw).images)
    assert calls == [True, True]
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe("a red cat", generator=gen(), **kw).images, plain)  # no NAG arguments: the stock call
    out = pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - plain).abs().max() > 1e-3
    out = pipe("a red cat", nag_negative_prompt_embeds=neg[0], nag_negative_prompt_attention_mask=neg[1],
               generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="must be given together"):
        pipe("a red cat", nag_negative_prompt_embeds=neg[0], **kw)
    remove_nag(pipe)
    assert torch.equal(pipe("a red cat", generator=gen(), **kw).images, plain)


def test_batches_num_images_per_prompt_and_nag_end():
    pipe = sana_toy.pipeline(SanaPipeline)
    prompts, negatives = ["a red cat", "a blue bird"], ["dog", "tree"]
    kw = {**COMMON, "guidance_scale": 3.0, "num_images_per_prompt": 2, "complex_human_instruction": None}
    settings = {"scale": 7.0, "tau": 2.0, "alpha": 0.5, "end": 0.1}
    neg = negative(pipe, prompts, negatives, per_image=2)
    expected, calls = expected_images(pipe, neg, settings, lambda: pipe(prompts, generator=gen(), **kw).images)
    assert calls == [True, False]  # nag_end 0.1: on at the first step (t = 999) only
    apply_nag(pipe, backend="torch", nag_end=0.1)
    out = pipe(prompts, nag_negative_prompt=negatives, nag_scale=7.0, nag_tau=2.0, nag_alpha=0.5, generator=gen(),
               **kw).images
    assert out.shape[0] == 4
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    one = negative(pipe, prompts, "dog", per_image=2)  # one NAG-negative string for every prompt
    expected, _ = expected_images(pipe, one, settings, lambda: pipe(prompts, generator=gen(), **kw).images)
    out = pipe(prompts, nag_negative_prompt="dog", nag_scale=7.0, nag_tau=2.0, nag_alpha=0.5, generator=gen(),
               **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["nag-only", "cfg"])
def test_controlnet_pipeline_guides_the_controlnet_too(guidance):
    pipe = sana_toy.pipeline(SanaControlNetPipeline)
    kw = {**COMMON, "guidance_scale": guidance, "control_image": sana_toy.image(), "controlnet_conditioning_scale": 0.8}
    plain = pipe("a red cat", generator=gen(), **kw).images
    neg = negative(pipe, "a red cat", "dog")
    expected, _ = expected_images(pipe, neg, RECOMMENDED, lambda: pipe("a red cat", generator=gen(), **kw).images)
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - plain).abs().max() > 1e-3
    remove_nag(pipe)
    assert torch.equal(pipe("a red cat", generator=gen(), **kw).images, plain)
    assert not hasattr(pipe.controlnet, "_nag_state")


@pytest.mark.parametrize("cls", [SanaSprintPipeline, SanaSprintImg2ImgPipeline], ids=["sprint", "sprint-img2img"])
def test_sprint_pipelines_nag_is_the_only_negative_prompt(cls):
    pipe = sana_toy.pipeline(cls)
    kw = {**COMMON, "guidance_scale": 4.5, "num_images_per_prompt": 2}
    if cls is SanaSprintImg2ImgPipeline:
        kw.update(image=sana_toy.image(), strength=1.0)
    plain = pipe("a red cat", generator=gen(), **kw).images
    neg = negative(pipe, "a red cat", "dog", per_image=2)
    expected, calls = expected_images(pipe, neg, RECOMMENDED, lambda: pipe("a red cat", generator=gen(), **kw).images,
                                      timestep_scale=1000.0)
    assert calls == [True, True]
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - plain).abs().max() > 1e-3
    # nag_end on Sprint's SCM timesteps (1.0 and 0.78 at the default 2 steps, on the 1000 scale): on at the first only
    settings = {**RECOMMENDED, "end": 0.2}
    expected, calls = expected_images(pipe, neg, settings,
                                      lambda: pipe("a red cat", generator=gen(), **kw).images, timestep_scale=1000.0)
    assert calls == [True, False]
    out = pipe("a red cat", nag_negative_prompt="dog", nag_end=0.2, generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
