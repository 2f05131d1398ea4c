"""apply_nag on Kandinsky6TI2VAPipeline: text-to-video-and-audio and image-to-video-and-audio with NAG, CFG on and
off, nag_end, prompt batches with one negative per prompt, num_videos_per_prompt, a padded NAG negative for an
unpadded prompt, the NAG negative as embeddings, prompt_embeds, the stock-equivalence cases, removal and bad input.

The expected videos come from the stock pipeline whose transformer forward is the independent float64 definition
(``kandinsky6_reference``) with the NAG negative's rows (encoded by the pipeline's own ``encode_prompt``) appended to
the conditional call's text where NAG is on at that step.
"""

from __future__ import annotations

import pytest
import torch

import kandinsky6_reference as reference
import kandinsky6_toy as toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5  # the model's float32 internals (test_kandinsky6_transformer) through two scheduler steps
SETTINGS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25, "end": 1.0}  # the family's recommendation
COMMON = dict(height=toy.SIZE, width=toy.SIZE, num_frames=toy.FRAMES, num_inference_steps=2,
              max_sequence_length=toy.SEQ_LEN, output_type="latent")


def gen():
    return torch.Generator().manual_seed(0)


def negative(pipe, negatives, per_video=1):
    """The NAG negative's embeddings and mask (``None``: unpadded), encoded as the pipeline encodes a prompt."""
    with torch.no_grad():
        out = pipe.encode_prompt(negatives, do_classifier_free_guidance=False, num_videos_per_prompt=per_video,
                                 max_sequence_length=toy.SEQ_LEN)
    return out[0], out[2]


def _keep(mask, rows, length):
    return torch.ones(rows, length, dtype=torch.bool) if mask is None else mask


def reference_forward(model, neg, settings, calls, cfg):
    """The transformer's forward for ``expected``: the reference, with ``neg`` appended to each conditional call's
    text (the first call of each step; the second is CFG's unconditional one) where NAG is on."""
    embeds, mask = neg

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, audio_hidden_states=None,
                visual_rope_pos=None, encoder_attention_mask=None, visual_token_type_ids=None, return_dict=True):
        conditional = not cfg or len(calls) % 2 == 0
        on = conditional and float(timestep[0]) >= (1 - settings["end"]) * 1000
        calls.append(on)
        text, keep = encoder_hidden_states, encoder_attention_mask
        if on:
            rows, length = text.shape[:2]
            text = torch.cat([text, embeds.to(text.dtype)])
            if keep is not None or mask is not None:
                keep = torch.cat([_keep(keep, rows, length), _keep(mask, rows, length)])
        video, audio = reference.forward(
            model, hidden_states, text, pooled_projections, timestep, audio_hidden_states, visual_rope_pos, keep,
            visual_token_type_ids, **{k: settings[k] for k in ("scale", "tau", "alpha")})
        dtype = hidden_states.dtype
        return (video.to(dtype),) if audio is None else (video.to(dtype), audio.to(dtype))

    return forward


def expected(pipe, neg, settings, call, cfg):
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, neg, settings, calls, cfg)
    try:
        return call(), calls
    finally:
        del pipe.transformer.forward


def close(actual, expected_, atol=ATOL):
    for a, e in zip(actual, expected_):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=atol)


def outputs(out):
    return out.frames, out.audio


@pytest.mark.parametrize("case", [
    dict(prompt=["a red cat", "a dog"], nag=["dog", "a tree on a hill"], guidance=1.0, end=0.1),
    dict(prompt="a red cat", nag="dog", guidance=3.0, per_video=2),
    dict(prompt="a red cat", nag="dog", guidance=1.0, image=True, audio=False),
    dict(prompt=["a red cat", "a dog"], nag="ugly", guidance=3.0, image=True, end=0.1),
], ids=["t2va-batch-cfg-off-nag-end", "t2va-cfg-2-per-prompt", "i2v-video-only", "i2va-batch-cfg-nag-end"])
def test_pipeline_matches_the_definition(case):
    pipe = toy.pipeline()
    per_video = case.get("per_video", 1)
    prompts = case["prompt"] if isinstance(case["prompt"], list) else [case["prompt"]]
    negatives = case["nag"] if isinstance(case["nag"], list) else [case["nag"]] * len(prompts)
    kw = {**COMMON, "guidance_scale": case["guidance"], "num_videos_per_prompt": per_video,
          "sample_audio": case.get("audio", True), "negative_prompt": "ugly, static"}
    if case.get("image"):
        kw["image"] = [toy.image()] * len(prompts)  # the stock pipeline takes one image per prompt
    settings = {**SETTINGS, "end": case.get("end", 1.0)}
    stock = outputs(pipe(prompt=case["prompt"], generator=gen(), **kw))
    cfg = case["guidance"] > 1
    want, calls = expected(pipe, negative(pipe, negatives, per_video), settings,
                           lambda: outputs(pipe(prompt=case["prompt"], generator=gen(), **kw)), cfg)
    on = [True, False] if settings["end"] < 1 else [True, True]
    assert calls == ([c for step in on for c in (step, False)] if cfg else on)
    apply_nag(pipe, backend="torch", nag_end=settings["end"])
    unguided = outputs(pipe(prompt=case["prompt"], generator=gen(), **kw))
    assert all(a is None or torch.equal(a, b) for a, b in zip(unguided, stock))  # no NAG arguments: stock
    out = outputs(pipe(prompt=case["prompt"], nag_negative_prompt=case["nag"], generator=gen(), **kw))
    close(out, want)
    assert out[0].shape[0] == len(prompts) * per_video and (out[0] - stock[0]).abs().max() > 1e-3
    assert (out[1] is None) == (not kw["sample_audio"])
    remove_nag(pipe)
    assert all(a is None or torch.equal(a, b) for a, b in zip(outputs(pipe(prompt=case["prompt"], generator=gen(),
                                                                             **kw)), stock))


def test_off_cases_and_the_negative_equal_to_the_prompt():
    pipe = toy.pipeline()
    kw = {**COMMON, "guidance_scale": 3.0}
    stock = outputs(pipe("a red cat", generator=gen(), **kw))
    apply_nag(pipe, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe("a red cat", nag_negative_prompt="dog", nag_scale=1.0,
                                                              generator=gen(), **kw)), stock))
    close(outputs(pipe("a red cat", nag_negative_prompt="a red cat", generator=gen(), **kw)), stock, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe("a red cat", generator=gen(), **kw)), stock))


def test_negative_as_embeddings_and_prompt_embeds_equal_the_text_path():
    pipe = apply_nag(toy.pipeline(), backend="torch")
    kw = {**COMMON, "guidance_scale": 1.0}
    prompts, negatives = ["a red cat", "a dog"], ["dog", "a tree on a hill"]
    text = outputs(pipe(prompt=prompts, nag_negative_prompt=negatives, generator=gen(), **kw))
    embeds, mask = negative(pipe, negatives)
    assert mask is not None
    given = outputs(pipe(prompt=prompts, nag_negative_prompt_embeds=embeds, nag_negative_prompt_attention_mask=mask,
                         generator=gen(), **kw))
    assert all(torch.equal(a, b) for a, b in zip(given, text))
    unpadded, none = negative(pipe, "a red cat and a dog")  # longer than SEQ_LEN: no padding, no mask
    assert none is None
    one = outputs(pipe(prompt=prompts, nag_negative_prompt="a red cat and a dog", generator=gen(), **kw))
    given = outputs(pipe(prompt=prompts, nag_negative_prompt_embeds=unpadded, generator=gen(), **kw))  # batch 1
    assert all(torch.equal(a, b) for a, b in zip(given, one))
    with torch.no_grad():
        embeds, pooled, _, *_ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False,
                                                   max_sequence_length=toy.SEQ_LEN)
    from_embeds = outputs(pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, nag_negative_prompt="dog",
                               generator=gen(), **kw))
    from_text = outputs(pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw))
    assert all(torch.equal(a, b) for a, b in zip(from_embeds, from_text))


def test_bad_nag_arguments_are_refused_naming_them():
    pipe = apply_nag(toy.pipeline(), backend="torch")
    kw = {**COMMON, "guidance_scale": 1.0}
    embeds, mask = negative(pipe, "dog")
    with pytest.raises(ValueError, match="give either nag_negative_prompt or nag_negative_prompt_embeds"):
        pipe("a red cat", nag_negative_prompt="dog", nag_negative_prompt_embeds=embeds, **kw)
    with pytest.raises(TypeError, match="nag_negative_prompt_attention_mask must be a bool"):
        pipe("a red cat", nag_negative_prompt_embeds=embeds, nag_negative_prompt_attention_mask=mask.double(), **kw)
    with pytest.raises(ValueError, match=r"nag_negative_prompt_embeds must have the per-row shape \(8, 32\)"):
        pipe("a red cat", nag_negative_prompt_embeds=embeds[:, :4], **kw)
    with pytest.raises(ValueError, match=r"nag_negative_prompt_attention_mask must be \[1, 8\]"):
        pipe("a red cat", nag_negative_prompt_embeds=embeds, nag_negative_prompt_attention_mask=mask[:, :4], **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 2"):
        pipe(["a red cat", "a dog"], nag_negative_prompt=["a", "b", "c"], **kw)
    with pytest.raises(ValueError, match="nag_scale"):
        pipe("a red cat", nag_negative_prompt="dog", nag_scale=0.5, **kw)
