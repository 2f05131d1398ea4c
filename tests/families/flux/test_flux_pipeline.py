"""apply_nag on stock Flux pipelines: call-time NAG arguments, batches, true CFG, nag_end, coexistence, errors.

Expected outputs come from the same pipeline, unpatched, with its transformer's forward replaced by the test's own
implementation of the authors' algorithm (``flux_reference``) fed the NAG-negative embeds from ``encode_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)

import flux_reference
import flux_toy
from nag_kernels.integrations import call_state
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=flux_toy.SEQ_LEN, output_type="latent")


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (flux_toy.SIZE, flux_toy.SIZE, 3), dtype=np.uint8))


EXTRA = {
    FluxPipeline: {},
    FluxImg2ImgPipeline: {"image": _image(1), "strength": 0.9},
    FluxInpaintPipeline: {"image": _image(1), "mask_image": _image(2), "strength": 0.9},
    FluxFillPipeline: {"image": _image(1), "mask_image": _image(2)},
    FluxControlPipeline: {"control_image": _image(3)},
    FluxKontextPipeline: {"image": _image(1), "_auto_resize": False, "max_area": flux_toy.SIZE**2},
}


def negative_embeds(pipe, negative, images_per_prompt=1):
    embeds, pooled, _ = pipe.encode_prompt(
        negative, num_images_per_prompt=images_per_prompt, max_sequence_length=flux_toy.SEQ_LEN
    )
    return embeds, pooled


def reference_forward(model, negative=None, uncond=None, nag_end=1.0, calls=None, **nag):
    """A stand-in for ``model.forward``: the authors' algorithm with ``negative`` appended on conditional calls."""

    def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, joint_attention_kwargs=None, return_dict=True, **_):
        text, pooled = encoder_hidden_states, pooled_projections
        conditional = uncond is None or not torch.allclose(text, uncond, rtol=0, atol=1e-12)
        on = float(timestep[0]) * 1000 >= (1 - nag_end) * 1000
        if negative is not None and conditional and on:
            text, pooled = torch.cat([text, negative[0]]), torch.cat([pooled, negative[1]])
        if calls is not None:
            calls.append(text.shape[0])
        out = flux_reference.flux_forward(model, hidden_states, text, pooled, timestep, img_ids, txt_ids, guidance, **nag)
        return (out,)

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
def test_every_flux_pipeline_matches_the_authors_algorithm(cls):
    pipe = flux_toy.pipeline(cls)
    kw = {**COMMON, **EXTRA[cls], "guidance_scale": 0.0}
    kw["prompt"] = "a red cat"  # by name: FluxKontextPipeline takes the image first
    plain = pipe(generator=gen(), **kw).images
    forward = reference_forward(pipe.transformer, negative_embeds(pipe, "blurry dog"))
    expected = run_reference(pipe, forward, generator=gen(), **kw)
    apply_nag(pipe, backend="torch", nag_end=1.0)  # Kontext's recommended nag_end is 0.25
    out = pipe(nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    remove_nag(pipe)
    assert type(pipe) is cls
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)


def test_off_and_neutral_calls_reproduce_the_unpatched_output():
    pipe = flux_toy.pipeline(FluxPipeline, guidance=True)
    kw = {**COMMON, "latents": flux_toy.latents(1), "guidance_scale": 3.5}
    stock = pipe("a red cat", **kw).images
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe("a red cat", **kw).images, stock)  # no NAG arguments: the stock call
    assert torch.equal(pipe("a red cat", nag_negative_prompt="dog", nag_scale=1.0, **kw).images, stock)
    same = pipe("a red cat", nag_negative_prompt="a red cat", **kw).images
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
    # nag_scale > 1 with no negative: the empty string, as the authors do
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "")), "a red cat", **kw)
    torch.testing.assert_close(pipe("a red cat", nag_scale=5.0, **kw).images, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "negative, per_prompt",
    [("blurry", 1), (["blurry", "a dog"], 1), ("blurry", 2)],
    ids=["broadcast", "per-prompt", "images-per-prompt"],
)
def test_batches_equal_their_batch_one_runs(negative, per_prompt):
    pipe = apply_nag(flux_toy.pipeline(FluxPipeline), backend="torch")
    prompts = ["a red cat", "green trees"]
    negatives = negative if isinstance(negative, list) else [negative] * 2
    latents = flux_toy.latents(2 * per_prompt)
    kw = {**COMMON, "guidance_scale": 0.0}
    batch = pipe(prompts, nag_negative_prompt=negative, num_images_per_prompt=per_prompt, latents=latents, **kw).images
    for i in range(2 * per_prompt):
        p = i // per_prompt
        one = pipe(prompts[p], nag_negative_prompt=negatives[p], latents=latents[i : i + 1], **kw).images
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-10)
    # the same negative given as embeds with batch 1 broadcasts the same way
    embeds, pooled = negative_embeds(pipe, negatives[0])
    if not isinstance(negative, list):
        out = pipe(prompts, nag_negative_prompt_embeds=embeds, nag_negative_pooled_prompt_embeds=pooled,
                   num_images_per_prompt=per_prompt, latents=latents, **kw).images
        torch.testing.assert_close(out, batch, rtol=0, atol=1e-12)


def test_true_cfg_guides_only_the_conditional_pass():
    pipe = flux_toy.pipeline(FluxPipeline)
    kw = {**COMMON, "latents": flux_toy.latents(1), "guidance_scale": 0.0, "true_cfg_scale": 2.0,
          "negative_prompt": "green trees"}
    uncond = negative_embeds(pipe, "green trees")[0]
    calls = []
    forward = reference_forward(pipe.transformer, negative_embeds(pipe, "blurry"), uncond=uncond, calls=calls)
    expected = run_reference(pipe, forward, "a red cat", **kw)
    assert calls == [2, 1, 2, 1]  # reference: NAG on the cond pass, plain uncond pass
    apply_nag(pipe, backend="torch")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True
    )
    out = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    handle.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert seen == [2, 1, 2, 1]  # what the transformer ran with, after the NAG pre-hook


def test_nag_end_turns_nag_off_by_noise_level():
    pipe = flux_toy.pipeline(FluxPipeline)
    kw = {**COMMON, "num_inference_steps": 4, "latents": flux_toy.latents(1), "guidance_scale": 0.0}
    calls = []
    forward = reference_forward(pipe.transformer, negative_embeds(pipe, "blurry"), nag_end=0.5, calls=calls)
    expected = run_reference(pipe, forward, "a red cat", **kw)
    assert 2 in calls and 1 in calls  # the threshold falls inside the schedule
    apply_nag(pipe, backend="torch")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True
    )
    out = pipe("a red cat", nag_negative_prompt="blurry", nag_end=0.5, **kw).images
    handle.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert seen == calls  # once off, the transformer runs the plain batch


def test_lora_fused_qkv_callback_and_offload_coexist(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = flux_toy.pipeline(FluxPipeline)
    kw = {**COMMON, "latents": flux_toy.latents(1), "guidance_scale": 0.0}
    donor = flux_toy.transformer().double()
    donor.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v", "proj_mlp"], init_lora_weights=False))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor))
    without_lora = run_reference(
        pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry")), "a red cat", **kw
    )

    apply_nag(pipe, backend="torch")
    pipe.transformer.fuse_qkv_projections()  # (diffusers fuses base weights only, so this runs before the LoRA is loaded)
    out = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    torch.testing.assert_close(out, without_lora, rtol=0, atol=1e-10)
    pipe.transformer.unfuse_qkv_projections()

    pipe.load_lora_weights(tmp_path, adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    remove_nag(pipe)
    expected = run_reference(
        pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry")), "a red cat", **kw
    )
    assert (expected - without_lora).abs().max() > 1e-5  # the adapter acts
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)

    steps = []

    def callback(p, i, t, tensors):
        steps.append(i)
        return {"prompt_embeds": tensors["prompt_embeds"].clone()}  # a new tensor object: still the cond pass

    out = pipe("a red cat", nag_negative_prompt="blurry", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw).images
    assert steps == [0, 1]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)

    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_bad_input_gets_clear_errors_and_the_pipeline_stays_usable():
    stock = flux_toy.pipeline(FluxPipeline)
    kw = {**COMMON, "latents": flux_toy.latents(1), "guidance_scale": 0.0}
    with pytest.raises(TypeError, match="nag_negative_prompt"):
        stock("a red cat", nag_negative_prompt="blurry", **kw)  # never patched
    plain = stock("a red cat", **kw).images

    pipe = apply_nag(stock, backend="torch")
    embeds, pooled = negative_embeds(pipe, "blurry")
    expected = pipe("a red cat", nag_negative_prompt="blurry", **kw).images
    bad = [
        (dict(nag_negative_prompt_embeds=embeds.repeat(3, 1, 1), nag_negative_pooled_prompt_embeds=pooled.repeat(3, 1)),
         "nag_negative_prompt_embeds must have batch 1, 1 .* got 3"),
        (dict(nag_negative_prompt_embeds=embeds[:, :5], nag_negative_pooled_prompt_embeds=pooled),
         r"nag_negative_prompt_embeds must have the per-row shape \(8, 32\)"),
        (dict(nag_negative_prompt_embeds=embeds[..., :16], nag_negative_pooled_prompt_embeds=pooled),
         r"nag_negative_prompt_embeds must have the per-row shape \(8, 32\)"),
        (dict(nag_negative_prompt_embeds=embeds), "must be given together"),
        (dict(nag_negative_prompt="blurry", nag_end=1.5), "nag_end must be in"),
        (dict(nag_negative_prompt="blurry", nag_scale=0.5), "nag_scale must be >= 1"),
        (dict(nag_negative_prompt=["a", "b", "c"]), "nag_negative_prompt must be one string or a list of 1 or 1"),
    ]
    for nag, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe("a red cat", **nag, **kw)
        assert "encode_prompt" not in pipe.__dict__ and call_state.call_config() is None
    assert torch.equal(pipe("a red cat", nag_negative_prompt="blurry", **kw).images, expected)
    assert torch.equal(pipe("a red cat", **kw).images, plain)

    remove_nag(pipe.transformer)  # the pipeline is patched but its transformer is not any more
    with pytest.raises(RuntimeError, match="not patched for NAG"):
        pipe("a red cat", nag_negative_prompt="blurry", **kw)
    with pytest.raises(TypeError, match="supported pipelines"):
        from diffusers import StableDiffusionPipeline

        apply_nag(StableDiffusionPipeline.__new__(StableDiffusionPipeline))
