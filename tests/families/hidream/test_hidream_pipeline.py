"""apply_nag on HiDreamImagePipeline: call-time NAG arguments (one negative per text encoder), CFG batched with only
the conditional rows guided, CFG off (HiDream-I1-Dev / -Fast), nag_end, batches, num_images_per_prompt, pre-encoded
negatives, model CPU offload, bad input.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
implementation of the definition (``hidream_reference``) fed the NAG negative from ``encode_prompt``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import HiDreamImagePipeline

import hidream_reference
import hidream_toy
from nag_kernels.integrations import apply_nag, call_state, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(num_inference_steps=2, max_sequence_length=hidream_toy.SEQ_LEN, output_type="latent")


def negative_embeds(pipe, negative, per_prompt=1, **others):
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(negative, num_images_per_prompt=per_prompt,
                                                    do_classifier_free_guidance=False,
                                                    max_sequence_length=hidream_toy.SEQ_LEN, **others)
    return t5, llama, pooled


def reference_forward(model, negative=None, calls=None, **nag):
    """A stand-in for ``model.forward``: the definition, the NAG negative appended for the conditional rows (all rows
    without CFG; the second half of the batched CFG rows with it)."""

    def forward(hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds,
                attention_kwargs=None, return_dict=True, **_):
        t5, llama, pooled = encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds
        if negative is not None:
            t5, llama, pooled = torch.cat([t5, negative[0]]), torch.cat([llama, negative[1]], 1), torch.cat(
                [pooled, negative[2]])
        if calls is not None:
            calls.append((hidden_states.shape[0], t5.shape[0]))
        return (hidream_reference.hidream_forward(model, hidden_states, timesteps, t5, llama, pooled, **nag),)

    return forward


def run_reference(pipe, forward, *args, **kwargs):
    pipe.transformer.forward = forward
    try:
        return pipe(*args, **kwargs).images
    finally:
        del pipe.transformer.forward


class watch:
    """Record (latent rows, T5 rows, Llama rows) of each transformer call as the pipeline makes it, and check that the
    forward, after NAG's pre-hooks, gets as many Llama rows as T5 rows (also when NAG is off at a step)."""

    def __init__(self, pipe, seen):
        def before(m, a, k):
            seen.append((k["hidden_states"].shape[0], k["encoder_hidden_states_t5"].shape[0],
                         k["encoder_hidden_states_llama3"].shape[1]))

        def after(m, a, k):
            assert k["encoder_hidden_states_llama3"].shape[1] == k["encoder_hidden_states_t5"].shape[0]

        model = pipe.transformer
        self.handles = [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                        model.register_forward_pre_hook(after, with_kwargs=True)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("cfg", [0.0, 4.0], ids=["no-cfg", "cfg"])
def test_pipeline_matches_the_definition(cfg, mode):
    pipe = hidream_toy.pipeline()
    kw = {**COMMON, "prompt": "a red cat", "guidance_scale": cfg}
    plain = pipe(generator=gen(), **kw).images
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry dog"), calls,
                                                     mode=mode), generator=gen(), **kw)
    assert calls[0] == ((2, 3) if cfg else (1, 2))  # CFG: latents [uncond; cond], text + the cond row's NAG row
    apply_nag(pipe, mode=mode, backend="torch")
    seen = []
    handle = watch(pipe, seen)
    out = pipe(nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    handle.remove()
    assert [s[:2] for s in seen] == calls and all(s[1] == s[2] for s in seen)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    remove_nag(pipe)
    assert type(pipe) is HiDreamImagePipeline
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)


def test_one_negative_per_text_encoder():
    pipe = hidream_toy.pipeline()
    kw = {**COMMON, "prompt": "a red cat", "guidance_scale": 0.0, "latents": hidream_toy.latents(1)}
    negatives = dict(prompt_2="green", prompt_3="blurry", prompt_4="a dog")
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "dark", **negatives)),
                             **kw)
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="dark", **{"nag_negative_" + k: v for k, v in negatives.items()}, **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    only_first = pipe(nag_negative_prompt="dark", **kw).images  # the others default to the first, as in the pipeline
    assert (only_first - out).abs().max() > 1e-6


def test_pre_encoded_prompt_and_cfg_negative():
    # The pipeline's own prompt given as embeddings: its encode_prompt call is still the positive one.
    pipe = apply_nag(hidream_toy.pipeline(), backend="torch")
    kw = {**COMMON, "latents": hidream_toy.latents(1), "guidance_scale": 4.0}
    t5, neg_t5, llama, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
        "a red cat", negative_prompt="green", max_sequence_length=hidream_toy.SEQ_LEN)
    expected = pipe("a red cat", negative_prompt="green", nag_negative_prompt="blurry", **kw).images
    out = pipe(prompt_embeds_t5=t5, prompt_embeds_llama3=llama, pooled_prompt_embeds=pooled,
               negative_prompt_embeds_t5=neg_t5, negative_prompt_embeds_llama3=neg_llama,
               negative_pooled_prompt_embeds=neg_pooled, nag_negative_prompt="blurry", **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_off_and_neutral_calls_reproduce_the_unpatched_output():
    pipe = hidream_toy.pipeline()
    kw = {**COMMON, "latents": hidream_toy.latents(1), "guidance_scale": 4.0, "negative_prompt": "green"}
    stock = pipe("a red cat", **kw).images
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe("a red cat", **kw).images, stock)  # no NAG arguments: the stock call
    assert torch.equal(pipe("a red cat", nag_negative_prompt="dog", nag_scale=1.0, **kw).images, stock)
    for mode in ("exact", "fast"):
        same = pipe("a red cat", nag_negative_prompt="a red cat", nag_scale=12.0, **kw).images
        torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
        apply_nag(pipe, mode="fast", backend="torch")


@pytest.mark.parametrize("cfg", [0.0, 4.0], ids=["no-cfg", "cfg"])
def test_batches_per_prompt_negatives_images_per_prompt_and_embeds(cfg):
    pipe = apply_nag(hidream_toy.pipeline(), backend="torch")
    prompts, negatives = ["a red cat", "green trees"], ["blurry", "a dog"]
    latents = hidream_toy.latents(4)
    kw = {**COMMON, "guidance_scale": cfg, "num_images_per_prompt": 2}
    batch = pipe(prompts, nag_negative_prompt=negatives, latents=latents, **kw).images
    for i in range(2):
        one = pipe(prompts[i], nag_negative_prompt=negatives[i], latents=latents[2 * i : 2 * i + 2], **kw).images
        torch.testing.assert_close(batch[2 * i : 2 * i + 2], one, rtol=0, atol=1e-10)
    t5, llama, pooled = negative_embeds(pipe, "blurry")  # batch 1: broadcast to every image
    embeds = dict(nag_negative_prompt_embeds_t5=t5, nag_negative_prompt_embeds_llama3=llama,
                  nag_negative_pooled_prompt_embeds=pooled)
    out = pipe(prompts, **embeds, latents=latents, **kw).images
    expected = pipe(prompts, nag_negative_prompt="blurry", latents=latents, **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    t5, llama, pooled = negative_embeds(pipe, negatives)  # one per prompt: repeated for each prompt's images
    out = pipe(prompts, nag_negative_prompt_embeds_t5=t5, nag_negative_prompt_embeds_llama3=llama,
               nag_negative_pooled_prompt_embeds=pooled, latents=latents, **kw).images
    torch.testing.assert_close(out, batch, rtol=0, atol=1e-12)


def test_nag_end_with_cfg_and_model_offload():
    pipe = hidream_toy.pipeline()
    kw = {**COMMON, "num_inference_steps": 4, "latents": hidream_toy.latents(1), "guidance_scale": 4.0}
    apply_nag(pipe, mode="fast", backend="torch")
    seen = []
    handle = watch(pipe, seen)
    out = pipe("a red cat", nag_negative_prompt="blurry", nag_end=0.5, **kw).images
    handle.remove()
    assert seen[0] == seen[-1] == (2, 3, 3)  # each call: latents [uncond; cond], text + the NAG row
    out_nag_on = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    assert (out - out_nag_on).abs().max() > 1e-6  # NAG was off at the last steps
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        torch.testing.assert_close(pipe("a red cat", nag_negative_prompt="blurry", nag_end=0.5, **kw).images, out,
                                   rtol=0, atol=1e-12)


def test_bad_input_gets_clear_errors_and_the_pipeline_stays_usable():
    pipe = apply_nag(hidream_toy.pipeline(), backend="torch")
    kw = {**COMMON, "latents": hidream_toy.latents(1), "guidance_scale": 0.0}
    expected = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    t5, llama, pooled = negative_embeds(pipe, "blurry")
    full = dict(nag_negative_prompt_embeds_t5=t5, nag_negative_prompt_embeds_llama3=llama,
                nag_negative_pooled_prompt_embeds=pooled)
    bad = [
        ({**full, "nag_negative_prompt_embeds_t5": t5[:, :5]},
         r"nag_negative_prompt_embeds_t5 must have the shape \(rows, 8, 32\)"),
        ({**full, "nag_negative_prompt_embeds_llama3": llama[:, :, :5]},
         r"nag_negative_prompt_embeds_llama3 must have the shape \(2, rows, 8, 24\)"),
        ({**full, "nag_negative_prompt_embeds_llama3": torch.cat([llama] * 3, 1)},
         "nag_negative_prompt_embeds_llama3 must have 1, 1 .* or 1 .* rows along dim 1, got 3"),
        ({**full, "nag_negative_prompt_embeds_llama3": llama[0]}, r"must have \[layers, rows, tokens, dim\]"),
        (dict(nag_negative_prompt_embeds_t5=t5), "must be given together"),
        (dict(nag_negative_prompt=["a", "b"]), "nag_negative_prompt must be one string or a list of 1 or 1"),
        (dict(nag_negative_prompt="blurry", nag_alpha=2.0), "nag_alpha"),
    ]
    for nag, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe("a red cat", **nag, **kw)
        assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None
    assert torch.equal(pipe("a red cat", nag_negative_prompt="blurry", **kw).images, expected)
