"""apply_nag on the stock HunyuanVideo15Pipeline and HunyuanVideo15ImageToVideoPipeline (CFG through their
``guider``): NAG with CFG on and off, nag_end, prompt batches and videos per prompt, pre-encoded negatives, MeanFlow
checkpoints, the stock pipelines reproduced, removal, errors.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
computation (``hunyuanvideo15_reference.forward``) fed the NAG negative from ``encode_prompt``.
"""

from __future__ import annotations

import hunyuanvideo15_reference as reference
import hunyuanvideo15_toy as toy
import pytest
import torch
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = 'a sign saying "hello" in the rain'  # quoted text: ByT5 tokens
NEGATIVE = "blurry, ugly"  # no quoted text: no ByT5 token
COMMON = dict(num_frames=5, num_inference_steps=2, output_type="latent")
T2V = dict(height=32, width=48)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def encoded(pipe, prompt, videos=1):
    batch = 1 if isinstance(prompt, str) else len(prompt)
    return pipe.encode_prompt(prompt, batch_size=batch, num_videos_per_prompt=videos, dtype=pipe.transformer.dtype)


def reference_forward(model, negative, uncond=None, calls=None, end=1.0, **nag):
    """The transformer's forward for an unpatched pipeline: the conditional call (text not ``uncond``'s) gets the
    NAG negative's rows while ``t >= (1 - end) * 1000`` and runs the reference computation."""

    def forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2=None,
                encoder_attention_mask_2=None, image_embeds=None, timestep_r=None, return_dict=True, **_):
        text = (encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2, encoder_attention_mask_2)
        conditional = uncond is None or text[0].shape != uncond[0].shape or not torch.equal(text[0], uncond[0])
        if negative is not None and conditional and float(timestep[0]) >= (1 - end) * 1000:
            text = tuple(torch.cat([x, n.to(x.dtype)]) for x, n in zip(text, negative))
        if calls is not None:
            calls.append(text[0].shape[0])
        return (reference.forward(model, hidden_states, timestep, *text, image_embeds, timestep_r, **nag),)

    return forward


def run_reference(pipe, forward, *args, **kwargs):
    pipe.transformer.forward = forward
    try:
        return pipe(*args, **kwargs).frames
    finally:
        del pipe.transformer.forward


def call_args(i2v, **kw):
    extra = {"image": toy.image(1)} if i2v else dict(T2V)
    return {**COMMON, **extra, **kw}


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_nag_with_cfg_on_and_off_matches_the_independent_computation(i2v, cfg):
    pipe = toy.pipeline(i2v, guidance_scale=cfg)
    kw = call_args(i2v, **({"negative_prompt": "trees"} if cfg > 1 else {}))
    stock = pipe(prompt=PROMPT, generator=gen(), **kw).frames
    uncond = encoded(pipe, "trees") if cfg > 1 else None
    calls = []
    forward = reference_forward(pipe.transformer, encoded(pipe, NEGATIVE), uncond, calls)
    want = run_reference(pipe, forward, prompt=PROMPT, generator=gen(), **kw)
    assert calls == ([2, 1, 2, 1] if cfg > 1 else [2, 2])
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe(prompt=PROMPT, generator=gen(), **kw).frames, stock)  # no NAG arguments: the stock call
    out = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).frames
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    assert (out - stock).abs().max() > 1e-4
    off = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, nag_scale=1.0, generator=gen(), **kw).frames
    assert torch.equal(off, stock)
    same = pipe(prompt=PROMPT, nag_negative_prompt=PROMPT, generator=gen(), **kw).frames  # negative == positive
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
    remove_nag(pipe)
    assert torch.equal(pipe(prompt=PROMPT, generator=gen(), **kw).frames, stock)


def test_nag_end_and_settings_per_call():
    pipe = toy.pipeline(guidance_scale=1.0)
    kw = call_args(False)
    calls = []
    settings = dict(nag_scale=9.0, nag_tau=3.0, nag_alpha=0.5)
    forward = reference_forward(pipe.transformer, encoded(pipe, NEGATIVE), calls=calls, end=0.25, **settings)
    want = run_reference(pipe, forward, prompt=PROMPT, generator=gen(), **kw)
    assert calls == [2, 1]  # t = 1000, 500: NAG on while t >= 750
    apply_nag(pipe, backend="torch")
    out = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, nag_end=0.25, generator=gen(), **settings, **kw).frames
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


def test_meanflow_image_to_video_passes_timestep_r():
    pipe = toy.pipeline(True, guidance_scale=1.0, meanflow=True)
    kw = call_args(True)
    forward = reference_forward(pipe.transformer, encoded(pipe, NEGATIVE))
    want = run_reference(pipe, forward, prompt=PROMPT, generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).frames
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


def test_prompt_batches_equal_their_batch_one_runs_and_pre_encoded_negatives():
    pipe = apply_nag(toy.pipeline(guidance_scale=3.0), backend="torch")
    prompts, negatives = [PROMPT, "green trees"], [NEGATIVE, 'a "dog"']
    latents = torch.randn(2, toy.LATENT_CHANNELS, 2, 2, 3, generator=gen(1), dtype=torch.float64)
    kw = call_args(False)
    batch = pipe(prompts, nag_negative_prompt=negatives, latents=latents, **kw).frames
    for i in range(2):
        one = pipe(prompts[i], nag_negative_prompt=negatives[i], latents=latents[i : i + 1], **kw).frames
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-10)
    embeds = encoded(pipe, NEGATIVE)  # one row: broadcast to every prompt
    names = ("nag_negative_prompt_embeds", "nag_negative_prompt_embeds_mask", "nag_negative_prompt_embeds_2",
             "nag_negative_prompt_embeds_mask_2")
    given = dict(zip(names, (embeds[0], embeds[1].long(), embeds[2], embeds[3].bool())))  # masks of any real dtype
    out = pipe(prompts, latents=latents, **given, **kw).frames
    torch.testing.assert_close(out, pipe(prompts, nag_negative_prompt=NEGATIVE, latents=latents, **kw).frames,
                               rtol=0, atol=1e-12)
    # a shorter pre-encoded negative (its own padding) is padded with masked zeros: the same result
    short = dict(zip(names, (embeds[0][:, :36], embeds[1][:, :36], embeds[2][:, :4], embeds[3][:, :4])))
    assert embeds[1][:, 36:].sum() == 0 and embeds[3][:, 4:].sum() == 0
    torch.testing.assert_close(pipe(prompts, latents=latents, **short, **kw).frames, out, rtol=0, atol=1e-12)


def test_videos_per_prompt_image_to_video_and_the_text_to_video_limit():
    pipe = toy.pipeline(True, guidance_scale=3.0)
    # the stock pipelines need one CFG negative per prompt (a single string fails in their encode_prompt)
    kw = call_args(True, num_videos_per_prompt=2, negative_prompt=["trees"] * 2)
    forward = reference_forward(pipe.transformer, encoded(pipe, [NEGATIVE] * 2, videos=2),
                                encoded(pipe, ["trees"] * 2, videos=2))
    want = run_reference(pipe, forward, prompt=[PROMPT, "green trees"], generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(prompt=[PROMPT, "green trees"], nag_negative_prompt=NEGATIVE, generator=gen(), **kw).frames
    assert out.shape[0] == 4
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    # HunyuanVideo15Pipeline passes one image-embedding row per prompt, so the stock text-to-video pipeline fails with
    # num_videos_per_prompt > 1 (diffusers 0.42.1); with NAG the call is refused with a clear error instead
    t2v = apply_nag(toy.pipeline(guidance_scale=1.0), backend="torch")
    with pytest.raises(RuntimeError):
        t2v(prompt=PROMPT, num_videos_per_prompt=2, **call_args(False))
    with pytest.raises(ValueError, match="image_embeds must have one row per video sample .*num_videos_per_prompt=1"):
        t2v(prompt=PROMPT, num_videos_per_prompt=2, nag_negative_prompt=NEGATIVE, **call_args(False))


def test_bad_nag_arguments_get_clear_errors():
    pipe = apply_nag(toy.pipeline(guidance_scale=1.0), backend="torch")
    kw = call_args(False)
    embeds = encoded(pipe, NEGATIVE)
    with pytest.raises(ValueError, match="must be given together"):
        pipe(prompt=PROMPT, nag_negative_prompt_embeds=embeds[0], nag_negative_prompt_embeds_mask=embeds[1], **kw)
    names = ("nag_negative_prompt_embeds", "nag_negative_prompt_embeds_mask", "nag_negative_prompt_embeds_2",
             "nag_negative_prompt_embeds_mask_2")
    given = dict(zip(names, embeds))
    with pytest.raises(TypeError, match="nag_negative_prompt_embeds_2 must be a floating-point tensor"):
        pipe(prompt=PROMPT, **{**given, "nag_negative_prompt_embeds_2": embeds[2].long()}, **kw)
    with pytest.raises(TypeError, match="nag_negative_prompt_embeds_mask_2 must be a bool, integer or floating"):
        pipe(prompt=PROMPT, **{**given, "nag_negative_prompt_embeds_mask_2": embeds[3].to(torch.complex64)}, **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds_mask_2 is on the meta device"):
        pipe(prompt=PROMPT, **{**given, "nag_negative_prompt_embeds_mask_2": embeds[3].to("meta")}, **kw)
    with pytest.raises(ValueError, match=r"nag_negative_prompt_embeds_2 must be \[rows, tokens, 16\]"):
        pipe(prompt=PROMPT, **{**given, "nag_negative_prompt_embeds_2": embeds[2][..., :8]}, **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds_mask must have the shape"):
        pipe(prompt=PROMPT, **{**given, "nag_negative_prompt_embeds_mask": embeds[1][:, :5]}, **kw)
    with pytest.raises(ValueError, match="give either"):
        pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, **given, **kw)
    with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 2"):
        pipe([PROMPT, "b"], nag_negative_prompt=["x", "y", "z"], **kw)
    with pytest.raises(ValueError, match="scale"):
        pipe(prompt=PROMPT, nag_scale=0.5, **kw)
