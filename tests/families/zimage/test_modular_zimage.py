"""apply_nag on Z-Image's modular blocks (ZImageAutoBlocks; its CFG guider disabled by default, Z-Image-Turbo's use):
the modular pipeline and the classic ZImagePipeline from the same components give bit-identical latents with CFG off
and agree within the stock pipelines' own difference with CFG on, in float32. (In float64 the stock pipelines differ:
the classic one passes a float32 timestep; with CFG, the classic pipeline batches both passes and extrapolates from
the positive prediction, which is the modular CFG guider's ``use_original_formulation=True``.) NAG's captions are a
list per sample (the family's join), nag_end, batches, stock reproduced, remove_nag exact, the classic errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.modular_pipelines import ZImageAutoBlocks

import modular_toy
import zimage_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=zimage_toy.SIZE, width=zimage_toy.SIZE, num_inference_steps=2, max_sequence_length=32)


def pipelines():
    classic = zimage_toy.pipeline(ZImagePipeline, dtype=torch.float32)
    return classic, modular_toy.modular(ZImageAutoBlocks, classic)


def set_cfg(modular, cfg):
    guider = modular_toy.cfg(cfg, use_original_formulation=True) if cfg else modular_toy.cfg(1.0, enabled=False)
    modular.update_components(guider=guider)


def classic_latents(pipe, prompt, cfg, **kw):
    return pipe(prompt=prompt, guidance_scale=cfg, generator=generator(), output_type="latent", **COMMON, **kw).images


def modular_latents(pipe, prompt, **kw):
    with modular_toy.quiet():
        return pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)


CASES = {
    "one prompt": ("a red cat", dict(nag_negative_prompt="blurry, watermark")),
    "nag_end": ("a red cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "batch": (["a red cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly"], num_images_per_prompt=2)),
}


@pytest.mark.parametrize("cfg", [4.0, 0.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, cfg):
    classic, modular = pipelines()
    set_cfg(modular, cfg)
    prompt, kw = CASES[case]
    batch = {key: value for key, value in kw.items() if not key.startswith("nag_")}
    stock = modular_latents(modular, prompt, **batch)
    stock_gap = (stock - classic_latents(classic, prompt, cfg, **batch)).abs().max()
    apply_nag(classic)
    apply_nag(modular)
    got = modular_latents(modular, prompt, **kw)
    expected = classic_latents(classic, prompt, cfg, **kw)
    if cfg:
        assert stock_gap < 1e-5
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    else:
        assert stock_gap == 0 and torch.equal(got, expected)
    assert (got - stock).abs().max() > 1e-4  # NAG acted


def test_stock_reproduced_and_remove_nag_exact():
    _, modular = pipelines()
    set_cfg(modular, 0.0)
    stock = modular_latents(modular, "a red cat")
    blocks = modular._blocks
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat"), stock)
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="x", nag_scale=1.0), stock)
    same = modular_latents(modular, "a red cat", nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)  # float32
    remove_nag(modular)
    assert modular._blocks is blocks and state_of(modular.transformer) is None
    assert torch.equal(modular_latents(modular, "a red cat"), stock)


def test_pre_encoded_negative_and_the_classic_errors():
    classic, modular = pipelines()
    set_cfg(modular, 0.0)
    apply_nag(classic)
    apply_nag(modular)
    with torch.no_grad():
        embeds = classic.encode_prompt("blurry", do_classifier_free_guidance=False, max_sequence_length=32)[0]
    kw = dict(nag_negative_prompt_embeds=embeds[0])  # one [L, D] tensor
    assert torch.equal(modular_latents(modular, ["a red cat", "a dog"], **kw),
                       classic_latents(classic, ["a red cat", "a dog"], 0.0, **kw))

    def both(error, match=None, prompt="a red cat", **nag):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, 0.0, **nag),
                               lambda: modular_latents(modular, prompt, **nag), match)

    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    both(TypeError, "nag_negative_prompt_embeds", nag_negative_prompt_embeds=embeds[0][None])
    both(ValueError, "not both", nag_negative_prompt="x", nag_negative_prompt_embeds=embeds[0])
