"""apply_nag on the LTX-2 pipelines: NAG arguments with CFG on and off, STG and modality isolation, nag_end, batches,
pre-encoded negatives, against the independent float64 computation; calls without NAG are the stock pipeline.

Expected outputs come from a stock pipeline on the same components whose transformer is ``ltx2_reference``'s model
run in the 2B layout, with the NAG negative's connector outputs (video, audio, mask) appended to every transformer
call whose last text rows are the positive prompt's: every positive-prompt pass (conditional, STG-perturbed,
modality-isolated) is NAG-guided, the unconditional CFG rows plain (docs/families/ltx2.md, "Pipelines").
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

import ltx2_toy
from ltx2_reference import PER_LATENT_ROW, reference_model
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=ltx2_toy.SIZE, width=ltx2_toy.SIZE, num_frames=ltx2_toy.FRAMES, frame_rate=ltx2_toy.FPS,
              num_inference_steps=2, max_sequence_length=ltx2_toy.SEQ_LEN, output_type="latent")
PLAIN = dict(guidance_scale=1.0, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0,
             audio_stg_scale=0.0, audio_modality_scale=1.0, audio_guidance_rescale=0.0)
CFG = dict(PLAIN, guidance_scale=3.0, audio_guidance_scale=2.0, guidance_rescale=0.5, negative_prompt="ugly")
ALL = dict(CFG, stg_scale=1.0, audio_stg_scale=0.5, modality_scale=2.0, audio_modality_scale=1.5,
           spatio_temporal_guidance_blocks=[1])  # CFG + STG + modality isolation: four passes per step


def connector_outputs(pipe, prompts, per_prompt=1):
    import inspect

    cfg = {"do_classifier_free_guidance": False} if "do_classifier_free_guidance" in inspect.signature(
        pipe.encode_prompt).parameters else {}
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, num_videos_per_prompt=per_prompt,
                                          max_sequence_length=ltx2_toy.SEQ_LEN, **cfg)[:2]
        return pipe.connectors(embeds, mask, padding_side="left")


def reference(pipe, positive, negative, scale=9.0, tau=3.5, alpha=0.25, end=1.0, audio=None):
    """A stock pipeline on ``pipe``'s components whose transformer is the reference model in the 2B layout."""
    model = reference_model(pipe.transformer, scale, tau, alpha, audio)
    settings = model._reference_settings
    rows = positive[0].shape[0]

    def pre(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        guided = text.shape[0] >= rows and torch.allclose(text[-rows:], positive[0], rtol=0, atol=1e-12)
        t = kwargs["timestep"].amax().item()
        if not guided or t < (1 - end) * 1000:
            return args, kwargs
        latent_rows = kwargs["hidden_states"].shape[0]
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = torch.cat([text, negative[0]])
        kwargs["audio_encoder_hidden_states"] = torch.cat([kwargs["audio_encoder_hidden_states"], negative[1]])
        for name in ("encoder_attention_mask", "audio_encoder_attention_mask"):
            kwargs[name] = torch.cat([kwargs[name], negative[2]])
        for name in PER_LATENT_ROW:
            x = kwargs.get(name)
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == latent_rows:
                kwargs[name] = torch.cat([x, x[latent_rows - rows:]])
        settings["guided"], settings["rows"] = rows, latent_rows
        return args, kwargs

    def post(module, args, kwargs, output):
        latent_rows = settings.pop("rows", None)
        settings["guided"] = 0
        return output if latent_rows is None else tuple(x[:latent_rows] for x in output)

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    ref = type(pipe)(**{**pipe.components, "transformer": model})
    ref.set_progress_bar_config(disable=True)
    return ref


def gen():
    return torch.Generator().manual_seed(0)


def image():
    rng = np.random.default_rng(1)
    return PIL.Image.fromarray(rng.integers(0, 255, (ltx2_toy.SIZE, ltx2_toy.SIZE, 3), dtype=np.uint8))


def call(pipe, prompt="a red cat", **kw):
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=gen(), **COMMON, **kw)
    return out.frames, out.audio


def close(out, expected, atol=1e-10):
    for o, e in zip(out, expected):
        if o is None:  # LTX2HDRPipeline renders video only
            assert e is None
            continue
        torch.testing.assert_close(o, e, rtol=0, atol=atol)


def moved(out, plain):
    return min((o - p).abs().max().item() for o, p in zip(out, plain) if o is not None)


CASES = [
    (LTX2Pipeline, "2.0", PLAIN), (LTX2Pipeline, "2.0", CFG), (LTX2Pipeline, "2.3", PLAIN), (LTX2Pipeline, "2.3", ALL),
    (LTX2ImageToVideoPipeline, "2.0", CFG), (LTX2ImageToVideoPipeline, "2.3", ALL),
]


@pytest.mark.parametrize("cls, version, guidance", CASES,
                         ids=["t2v-2.0-nag-only", "t2v-2.0-cfg", "t2v-2.3-nag-only", "t2v-2.3-cfg-stg-modality",
                              "i2v-2.0-cfg", "i2v-2.3-cfg-stg-modality"])
def test_pipeline_matches_the_reference(cls, version, guidance):
    pipe = ltx2_toy.pipeline(cls, version)
    kw = {**guidance, **({"image": image(), "image_crf": 0} if cls is LTX2ImageToVideoPipeline else {})}
    plain = call(pipe, **kw)
    positive, negative = connector_outputs(pipe, ["a red cat"]), connector_outputs(pipe, ["dog"])
    assert positive[2].bool().all()  # diffusers 0.42.1's connectors return an all-ones mask (docs/families/ltx2.md)
    expected = call(reference(pipe, positive, negative), **kw)
    apply_nag(pipe, backend="torch")
    out = call(pipe, nag_negative_prompt="dog", **kw)
    close(out, expected)
    assert moved(out, plain) > 1e-3
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt("dog", do_classifier_free_guidance=False,
                                          max_sequence_length=ltx2_toy.SEQ_LEN)[:2]
    close(call(pipe, nag_negative_prompt_embeds=embeds, nag_negative_prompt_attention_mask=mask, **kw), expected)
    assert all(torch.equal(a, b) for a, b in zip(call(pipe, **kw), plain))  # no NAG arguments: the stock call
    remove_nag(pipe)
    assert all(a is b or torch.equal(a, b) for a, b in zip(call(pipe, **kw), plain))


def test_batches_nag_end_and_settings():
    pipe = ltx2_toy.pipeline(LTX2Pipeline, "2.3")
    prompts, negatives = ["a red cat", "a blue bird"], ["dog", "blurry"]
    kw = dict(CFG, negative_prompt=["ugly", "dark"], num_videos_per_prompt=2)
    positive = connector_outputs(pipe, prompts, 2)
    negative = connector_outputs(pipe, negatives, 2)
    expected = call(reference(pipe, positive, negative, 11.0, 2.0, 0.5), prompts, **kw)
    apply_nag(pipe, backend="torch")
    out = call(pipe, prompts, nag_negative_prompt=negatives, nag_scale=11.0, nag_tau=2.0, nag_alpha=0.5, **kw)
    assert out[0].shape[0] == 4
    close(out, expected)
    # nag_end: NAG on at the first step only (the toy schedule's second timestep is below 1000 * (1 - 0.1))
    one = connector_outputs(pipe, ["dog"], 2)
    positive = connector_outputs(pipe, ["a red cat"], 2)
    expected = call(reference(pipe, positive, one, end=0.1), **dict(kw, negative_prompt="ugly"))
    out = call(pipe, nag_negative_prompt="dog", nag_end=0.1, **dict(kw, negative_prompt="ugly"))
    close(out, expected)
    plain = call(pipe, nag_scale=1.0, **dict(kw, negative_prompt="ugly"))
    full = call(pipe, nag_negative_prompt="dog", **dict(kw, negative_prompt="ugly"))
    assert moved(out, plain) > 1e-4 and moved(out, full) > 1e-4


def test_audio_settings_through_the_pipelines_attention_kwargs():
    pipe = ltx2_toy.pipeline(LTX2Pipeline, "2.3")
    own = {"scale": 3.0, "tau": 2.0, "alpha": 0.5}
    positive, negative = connector_outputs(pipe, ["a red cat"]), connector_outputs(pipe, ["dog"])
    expected = call(reference(pipe, positive, negative, audio=own), **ALL)
    apply_nag(pipe, backend="torch")
    extra = {"attention_kwargs": {f"audio_nag_{k}": v for k, v in own.items()}}
    close(call(pipe, nag_negative_prompt="dog", **ALL, **extra), expected)
    plain = call(pipe, **ALL)
    assert all(torch.equal(a, b) for a, b in zip(call(pipe, **ALL, **extra), plain))  # no NAG: the keys are dropped


def test_bad_nag_arguments():
    pipe = apply_nag(ltx2_toy.pipeline(LTX2Pipeline, "2.0"), backend="torch")
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt("dog", do_classifier_free_guidance=False,
                                          max_sequence_length=ltx2_toy.SEQ_LEN)[:2]
    with pytest.raises(ValueError, match="must be given together"):
        call(pipe, nag_negative_prompt_embeds=embeds, **PLAIN)
    with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 2"):
        call(pipe, ["a", "b"], nag_negative_prompt=["x", "y", "z"], **PLAIN)
    with pytest.raises(ValueError, match="per-row shape"):
        call(pipe, nag_negative_prompt_embeds=embeds[:, :8], nag_negative_prompt_attention_mask=mask[:, :8], **PLAIN)
    with pytest.raises(ValueError, match="scale"):
        call(pipe, nag_negative_prompt="dog", nag_scale=0.5, **PLAIN)


def _condition_inputs(cls):
    from diffusers.pipelines.ltx2 import LTX2HDRReferenceCondition
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    frames = torch.rand((1, 3, ltx2_toy.SIZE, ltx2_toy.SIZE), generator=torch.Generator().manual_seed(2))
    if cls.__name__ == "LTX2HDRPipeline":
        return {"reference_conditions": LTX2HDRReferenceCondition(frames=frames, strength=1.0)}
    if cls.__name__ == "LTX2InContextPipeline":
        return {"conditions": LTX2VideoCondition(frames=frames, index=0, strength=1.0, crf=0)}
    return {"conditions": LTX2VideoCondition(frames=frames, index=0, strength=1.0, crf=0)}


@pytest.mark.parametrize("name, version, guidance", [
    ("LTX2ConditionPipeline", "2.3", ALL), ("LTX2InContextPipeline", "2.0", CFG), ("LTX2HDRPipeline", "2.3", PLAIN),
    ("LTX2HDRPipeline", "2.0", CFG)], ids=["condition-2.3-cfg-stg-modality", "in-context-2.0-cfg",
                                          "hdr-2.3-nag-only", "hdr-2.0-cfg"])
def test_conditioned_pipelines_match_the_reference(name, version, guidance):
    import diffusers

    cls = getattr(diffusers, name)
    pipe = ltx2_toy.pipeline(cls, version)
    kw = {**guidance, **_condition_inputs(cls)}
    if name == "LTX2HDRPipeline":
        kw = {k: v for k, v in kw.items() if not k.startswith("audio_")}
    plain = call(pipe, **kw)
    positive, negative = connector_outputs(pipe, ["a red cat"]), connector_outputs(pipe, ["dog"])
    expected = call(reference(pipe, positive, negative), **kw)
    apply_nag(pipe, backend="torch")
    out = call(pipe, nag_negative_prompt="dog", **kw)
    close(out, expected)
    assert moved(out, plain) > 1e-3
    remove_nag(pipe)
    assert all(a is b or torch.equal(a, b) for a, b in zip(call(pipe, **kw), plain))


def test_dfr_pipeline_matches_the_reference():
    """LTX2DFRPipeline: the distilled keyframe pipeline (no CFG: every call is the positive one, per-token timesteps,
    keyframe markers); its ``encode_prompt`` takes no ``do_classifier_free_guidance``."""
    from diffusers import LTX2DFRPipeline

    pipe = ltx2_toy.pipeline(LTX2DFRPipeline, "2.3", use_keyframes_abs_pos_embedding=True)
    kw = dict(height=ltx2_toy.SIZE, width=ltx2_toy.SIZE, num_frames=9, frame_rate=ltx2_toy.FPS, sigmas=[1.0, 0.5],
              max_sequence_length=ltx2_toy.SEQ_LEN, output_type="latent")

    def run(p, **extra):
        with torch.no_grad():
            out = p(prompt="a red cat", generator=gen(), **kw, **extra)
        return out.frames, out.audio

    plain = run(pipe)
    positive, negative = connector_outputs(pipe, ["a red cat"]), connector_outputs(pipe, ["dog"])
    expected = run(reference(pipe, positive, negative))
    apply_nag(pipe, backend="torch")
    out = run(pipe, nag_negative_prompt="dog")
    close(out, expected)
    assert moved(out, plain) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(run(pipe), plain))
