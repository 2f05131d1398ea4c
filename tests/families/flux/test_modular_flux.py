"""apply_nag on FLUX.1's modular blocks (FluxAutoBlocks, no guider): the modular pipeline and the classic FluxPipeline
built from the same components give bit-identical latents with NAG (batches, nag_end, pre-encoded negatives, the
guidance-distilled variant), the stock modular pipeline is reproduced, remove_nag restores it exactly, bad input
gets the classic pipeline's errors, and a ComponentsManager-built pipeline works.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.modular_pipelines import ComponentsManager, FluxAutoBlocks

import flux_toy
import modular_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=flux_toy.SEQ_LEN)


def pipelines(guidance: bool = False):
    classic = flux_toy.pipeline(FluxPipeline, guidance)
    return classic, modular_toy.modular(FluxAutoBlocks, classic)


def classic_latents(pipe, prompt, **kw):
    packed = pipe(prompt, generator=generator(), output_type="latent", **COMMON, **kw).images
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)


def modular_latents(pipe, prompt, **kw):
    return pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)


CASES = {
    "one prompt": ("a red cat", dict(nag_negative_prompt="blurry, watermark")),
    "nag_end": ("a red cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "settings per call": ("a red cat", dict(nag_negative_prompt="blurry", nag_scale=3.0, nag_tau=2.0, nag_alpha=0.5)),
    "batch": (["a red cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly."], num_images_per_prompt=2)),
    "one negative for a batch": (["a red cat", "a dog"], dict(nag_negative_prompt="blurry")),
    "nag_scale only": ("a red cat", dict(nag_scale=4.0)),
}


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "dev"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, guidance):
    classic, modular = pipelines(guidance)
    apply_nag(classic)
    apply_nag(modular)
    prompt, kw = CASES[case]
    extra = {"guidance_scale": 3.5} if guidance else {}
    expected = classic_latents(classic, prompt, **kw, **extra)
    got = modular_latents(modular, prompt, **kw, **extra)
    assert torch.equal(got, expected)
    assert not torch.equal(got, modular_latents(modular, prompt, **extra))  # NAG acted


def test_pre_encoded_negative_matches_classic():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    embeds, pooled, _ = classic.encode_prompt("blurry", prompt_2=None, max_sequence_length=flux_toy.SEQ_LEN)
    kw = dict(nag_negative_prompt_embeds=embeds, nag_negative_pooled_prompt_embeds=pooled)
    expected = classic_latents(classic, ["a red cat", "a dog"], num_images_per_prompt=2, **kw)
    got = modular_latents(modular, ["a red cat", "a dog"], num_images_per_prompt=2, **kw)
    assert torch.equal(got, expected)
    from_text = modular_latents(modular, ["a red cat", "a dog"], num_images_per_prompt=2, nag_negative_prompt="blurry")
    torch.testing.assert_close(got, from_text, rtol=0, atol=1e-10)  # the text encoded in a batch of 2: rounding


def test_stock_modular_pipeline_reproduced():
    _, modular = pipelines()
    stock = modular_latents(modular, "a red cat")
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat"), stock)  # no NAG arguments: the stock call
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry", nag_scale=1.0), stock)
    same = modular_latents(modular, "a red cat", nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)


def test_remove_nag_is_bit_identical():
    _, modular = pipelines()
    blocks, inputs = modular._blocks, [p.name for p in modular._blocks.inputs]
    stock = modular_latents(modular, "a red cat")
    apply_nag(modular, nag_scale=7.0)
    assert "nag_negative_prompt" in [p.name for p in modular._blocks.inputs]
    assert not torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry"), stock)
    remove_nag(modular)
    assert modular._blocks is blocks and [p.name for p in modular._blocks.inputs] == inputs
    assert state_of(modular.transformer) is None
    assert torch.equal(modular_latents(modular, "a red cat"), stock)
    with modular_toy.quiet(), pytest.warns(UserWarning, match="nag_negative_prompt"):
        modular_latents(modular, "a red cat", nag_negative_prompt="blurry")  # an unknown input again: dropped


def test_nag_context_manager_and_settings():
    classic, modular = pipelines()
    stock = modular_latents(modular, "a red cat")
    with nag(classic, nag_scale=3.0), nag(modular, nag_scale=3.0):
        expected = classic_latents(classic, "a red cat", nag_negative_prompt="blurry")
        assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry"), expected)
    assert state_of(modular.transformer) is None and torch.equal(modular_latents(modular, "a red cat"), stock)
    apply_nag(modular, nag_scale=3.0)
    with nag(modular, nag_scale=9.0):  # an applied pipeline: the exit restores its settings
        nine = modular_latents(modular, "a red cat", nag_negative_prompt="blurry")
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry", nag_scale=9.0), nine)
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry"), expected)


def test_bad_input_gets_the_classic_errors():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)

    def both(error, match=None, prompt="a red cat", **kw):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, **kw),
                               lambda: modular_latents(modular, prompt, **kw), match)

    both(ValueError, "nag_scale", nag_negative_prompt="x", nag_scale=0.5)
    both(ValueError, "nag_alpha", nag_negative_prompt="x", nag_alpha=2.0)
    both(TypeError, "nag_negative_prompt", nag_negative_prompt=3)
    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    embeds, pooled, _ = classic.encode_prompt("x", prompt_2=None, max_sequence_length=flux_toy.SEQ_LEN)
    both(ValueError, "together", nag_negative_prompt_embeds=embeds)
    both(ValueError, "not both", nag_negative_prompt="x", nag_negative_prompt_embeds=embeds,
         nag_negative_pooled_prompt_embeds=pooled)
    both(ValueError, "batch", prompt=["a", "b", "c"], nag_negative_prompt_embeds=embeds.repeat(2, 1, 1),
         nag_negative_pooled_prompt_embeds=pooled.repeat(2, 1))
    both(ValueError, "per-row shape", nag_negative_prompt_embeds=embeds[:, :3],
         nag_negative_pooled_prompt_embeds=pooled)


def test_apply_refusals():
    bare = FluxAutoBlocks().init_pipeline()  # no components loaded
    with pytest.raises(ValueError, match="no transformer loaded"):
        apply_nag(bare)
    _, modular = pipelines()
    with pytest.raises(ValueError, match="nag_scale"):
        apply_nag(modular, nag_scale=0.0)
    assert state_of(modular.transformer) is None and "_nag_original_blocks" not in modular.__dict__
    apply_nag(modular)
    modular.update_components(transformer=flux_toy.transformer().to(torch.float64))  # replaced after apply_nag
    with modular_toy.quiet(), pytest.raises(RuntimeError, match="not patched for NAG"):
        modular_latents(modular, "a red cat", nag_negative_prompt="x")


def test_components_manager():
    classic = flux_toy.pipeline(FluxPipeline)
    manager = ComponentsManager()
    modular = modular_toy.modular(FluxAutoBlocks, classic, components_manager=manager)
    assert len(manager.components) >= 1
    apply_nag(classic)
    apply_nag(modular)
    expected = classic_latents(classic, "a red cat", nag_negative_prompt="blurry")
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry"), expected)
    # a second pipeline over the manager's components with its own settings: each keeps its own
    other = modular_toy.modular(FluxAutoBlocks, classic, components_manager=manager)
    apply_nag(other, nag_scale=9.0)
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="blurry"), expected)
    remove_nag(modular)
    assert state_of(other.transformer) is not None  # still needed by the other pipeline
    remove_nag(other)
    assert state_of(other.transformer) is not None  # and by the classic pipeline
    remove_nag(classic)
    assert state_of(other.transformer) is None


def test_kontext_matches_classic_and_recommends_its_nag_end():
    import numpy as np
    import PIL.Image
    from diffusers import FluxKontextPipeline
    from diffusers.modular_pipelines import FluxKontextAutoBlocks

    classic = flux_toy.pipeline(FluxKontextPipeline)
    modular = modular_toy.modular(FluxKontextAutoBlocks, classic)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = dict(image=image, _auto_resize=False, max_area=flux_toy.SIZE**2)  # the 32 x 32 image as it is
    stock = modular_latents(modular, "a red cat", **kw)
    apply_nag(classic)
    apply_nag(modular)
    assert modular.__dict__["_nag_config"].end == 0.25  # FLUX.1 Kontext's recommended nag_end, as the classic one's
    for settings in (dict(nag_negative_prompt="blurry"), dict(nag_negative_prompt="blurry", nag_end=1.0)):
        got = modular_latents(modular, "a red cat", **kw, **settings)
        packed = classic(prompt="a red cat", generator=generator(), output_type="latent", **COMMON, **kw,
                         **settings).images
        assert torch.equal(got, classic._unpack_latents(packed, 32, 32, classic.vae_scale_factor))
        assert not torch.equal(got, stock)
    remove_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat", **kw), stock)
