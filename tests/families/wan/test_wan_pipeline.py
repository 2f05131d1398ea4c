"""apply_nag on stock Wan pipelines: NAG arguments, CFG guiding only the conditional pass, Wan 2.2's two experts,
batches, offloading and bad input.

Expected outputs come from a stock pipeline built from the same components whose transformer(s) are unpatched
copies running the authors' cross-attention (``test_wan_transformer.authors_model``), with the NAG negative's
embeddings (from ``encode_prompt``) appended to every call that carries the positive embeddings.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

import wan_toy
from nag_kernels.integrations import call_state
from nag_kernels.integrations import apply_nag, remove_nag
from test_wan_transformer import authors_model

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES, num_inference_steps=2,
              max_sequence_length=wan_toy.SEQ_LEN, output_type="latent")


def embeds(pipe, prompt, per_prompt=1):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, do_classifier_free_guidance=False, num_videos_per_prompt=per_prompt,
                              max_sequence_length=wan_toy.SEQ_LEN)[0]


def reference(pipe, positive, negative, experts=("transformer",), **nag):
    """A stock pipeline on the same components whose experts run the authors' computation and get ``negative``
    appended to the calls that carry ``positive`` (the conditional pass)."""

    def append(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        if text.shape == positive.shape and torch.allclose(text, positive, rtol=0, atol=1e-12):
            kwargs = {**kwargs, "encoder_hidden_states": torch.cat([text, negative])}
            image = kwargs.get("encoder_hidden_states_image")
            if image is not None:  # the authors' layout: the I2V image context with 2B rows too
                kwargs["encoder_hidden_states_image"] = torch.cat([image, image])
        return args, kwargs

    parts = dict(pipe.components)
    for name in experts:
        parts[name] = authors_model(parts[name], **nag)
        parts[name].register_forward_pre_hook(append, with_kwargs=True)
    config = {k: pipe.config[k] for k in ("boundary_ratio", "expand_timesteps") if k in pipe.config}
    ref = type(pipe)(**parts, **config)
    ref.set_progress_bar_config(disable=True)
    return ref


def frames(pipe, *args, **kwargs):
    return pipe(*args, **kwargs).frames


def test_nag_matches_the_authors_and_remove_restores_the_stock_pipeline():
    pipe = wan_toy.pipeline()
    kw = {**COMMON, "latents": wan_toy.latents(1), "guidance_scale": 1.0}
    plain = frames(pipe, "a red cat", **kw)
    ref = reference(pipe, embeds(pipe, "a red cat"), embeds(pipe, "blurry dog"))
    expected = frames(ref, "a red cat", **kw)
    apply_nag(pipe, backend="torch")
    out = frames(pipe, "a red cat", nag_negative_prompt="blurry dog", **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-3
    assert torch.equal(frames(pipe, "a red cat", **kw), plain)  # no NAG arguments: the stock call
    assert torch.equal(frames(pipe, "a red cat", nag_negative_prompt="blurry dog", nag_scale=1.0, **kw), plain)
    # pre-encoded negative: the same result
    out = frames(pipe, "a red cat", nag_negative_prompt_embeds=embeds(pipe, "blurry dog"), **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    remove_nag(pipe)
    assert type(pipe) is WanPipeline
    assert torch.equal(frames(pipe, "a red cat", **kw), plain)


def test_cfg_guides_only_the_conditional_pass():
    pipe = wan_toy.pipeline()
    kw = {**COMMON, "latents": wan_toy.latents(1), "guidance_scale": 4.0, "negative_prompt": "ugly"}
    ref = reference(pipe, embeds(pipe, "a red cat"), embeds(pipe, "blurry dog"))
    expected = frames(ref, "a red cat", **kw)
    apply_nag(pipe, backend="torch")
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True, prepend=True)
    out = frames(pipe, "a red cat", nag_negative_prompt="blurry dog", **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert calls == [2, 1, 2, 1]  # per step: the guided conditional pass (2B text rows), then the plain one


def test_wan22_two_experts_are_both_guided_and_one_unpatched_expert_is_refused():
    pipe = wan_toy.pipeline(two_experts=True)
    kw = {**COMMON, "latents": wan_toy.latents(1), "guidance_scale": 1.0, "num_inference_steps": 4}
    positive, negative = embeds(pipe, "a red cat"), embeds(pipe, "blurry dog")
    ref = reference(pipe, positive, negative, experts=("transformer", "transformer_2"))
    only_first = reference(pipe, positive, negative, experts=("transformer",))
    expected = frames(ref, "a red cat", **kw)
    apply_nag(pipe, backend="torch")
    seen = {"transformer": 0, "transformer_2": 0}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, k, name=name: seen.__setitem__(name, seen[name] + 1), with_kwargs=True)
    out = frames(pipe, "a red cat", nag_negative_prompt="blurry dog", **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert seen["transformer"] > 0 and seen["transformer_2"] > 0  # boundary_ratio splits the steps
    assert (expected - frames(only_first, "a red cat", **kw)).abs().max() > 1e-5  # the second expert's NAG acts
    remove_nag(pipe.transformer_2)
    with pytest.raises(RuntimeError, match="WanPipeline.transformer_2 is not patched for NAG"):
        frames(pipe, "a red cat", nag_negative_prompt="blurry dog", **kw)
    apply_nag(pipe, backend="torch")
    torch.testing.assert_close(frames(pipe, "a red cat", nag_negative_prompt="blurry dog", **kw), expected,
                               rtol=0, atol=1e-10)


def test_batches_and_per_prompt_negatives():
    pipe = wan_toy.pipeline()
    prompts, negatives = ["a red cat", "a blue dog"], ["blurry", "dark"]
    kw = {**COMMON, "latents": wan_toy.latents(4), "guidance_scale": 1.0, "num_videos_per_prompt": 2}
    ref = reference(pipe, embeds(pipe, prompts, 2), embeds(pipe, negatives, 2))
    expected = frames(ref, prompts, **kw)
    apply_nag(pipe, backend="torch")
    out = frames(pipe, prompts, nag_negative_prompt=negatives, **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    # one pre-encoded negative per prompt is repeated for each of its videos
    out = frames(pipe, prompts, nag_negative_prompt_embeds=embeds(pipe, negatives), **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_model_cpu_offload():
    pipe = wan_toy.pipeline()
    kw = {**COMMON, "latents": wan_toy.latents(1), "guidance_scale": 1.0}
    expected = frames(reference(pipe, embeds(pipe, "a red cat"), embeds(pipe, "blurry")), "a red cat", **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = frames(pipe, "a red cat", nag_negative_prompt="blurry", **kw)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_bad_input_gets_clear_errors_and_the_pipeline_stays_usable():
    pipe = apply_nag(wan_toy.pipeline(), backend="torch")
    kw = {**COMMON, "latents": wan_toy.latents(1), "guidance_scale": 1.0}
    negative = embeds(pipe, "blurry")
    expected = frames(pipe, "a red cat", nag_negative_prompt="blurry", **kw)
    bad = [
        (dict(nag_negative_prompt_embeds=negative[:, :5]), r"must have the per-row shape \(8, 32\)"),
        (dict(nag_negative_prompt_embeds=negative[..., :16]), r"must have the per-row shape \(8, 32\)"),
        (dict(nag_negative_prompt_embeds=negative.repeat(3, 1, 1)), "must have batch 1, 1 .* got 3"),
        (dict(nag_negative_prompt=["a", "b"]), "nag_negative_prompt must be one string or a list of 1 or 1"),
        (dict(nag_negative_prompt="blurry", nag_scale=0.5), "nag_scale must be >= 1"),
    ]
    for nag, message in bad:
        with pytest.raises(ValueError, match=message):
            frames(pipe, "a red cat", **nag, **kw)
        assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None
    assert torch.equal(frames(pipe, "a red cat", nag_negative_prompt="blurry", **kw), expected)
