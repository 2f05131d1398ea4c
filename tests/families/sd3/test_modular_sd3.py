"""apply_nag on SD3's modular blocks (StableDiffusion3AutoBlocks, CFG guider): the modular pipeline and the classic
StableDiffusion3Pipeline built from the same components give bit-identical latents with CFG off and, with CFG on,
agree within the stock pipelines' own difference (the classic pipeline batches CFG's two passes into one call, the
modular guider runs them apart: float64 rounding, ~1e-16 without NAG); NAG on the conditional pass only, nag_end,
batches, the second and third NAG negative prompts, stock reproduced, remove_nag exact, the classic errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

import modular_toy
import sd3_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8)


def pipelines():
    classic = sd3_toy.pipeline(StableDiffusion3Pipeline)
    return classic, modular_toy.modular(StableDiffusion3AutoBlocks, classic)


def classic_latents(pipe, prompt, cfg, **kw):
    negative = "trees" if isinstance(prompt, str) else ["trees"] * len(prompt)
    return pipe(prompt=prompt, negative_prompt=negative, guidance_scale=cfg, generator=generator(),
                output_type="latent", **COMMON, **kw).images


def modular_latents(pipe, prompt, cfg=None, **kw):
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg))
    negative = "trees" if isinstance(prompt, str) else ["trees"] * len(prompt)
    with modular_toy.quiet():
        return pipe(prompt=prompt, negative_prompt=negative, generator=generator(), output="latents", **COMMON, **kw)


CASES = {
    "one prompt": ("a red cat", dict(nag_negative_prompt="blurry, watermark")),
    "nag_end": ("a red cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "second negative": ("a red cat", dict(nag_negative_prompt="blurry", nag_negative_prompt_2="ugly",
                                          nag_negative_prompt_3="dark")),
    "prompts": (["a red cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly"])),
    "images per prompt": ("a red cat", dict(nag_negative_prompt="blurry", num_images_per_prompt=2)),
}


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, cfg):
    classic, modular = pipelines()
    prompt, kw = CASES[case]
    batch = {key: value for key, value in kw.items() if not key.startswith("nag_")}
    stock = modular_latents(modular, prompt, cfg, **batch)
    stock_gap = (stock - classic_latents(classic, prompt, cfg, **batch)).abs().max()
    apply_nag(classic)
    apply_nag(modular)
    rows = []
    hook = modular.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append((k["hidden_states"].shape[0], k["encoder_hidden_states"].shape[0])),
        with_kwargs=True, prepend=True)
    got = modular_latents(modular, prompt, **kw)
    hook.remove()
    images = 1 if case in ("one prompt", "nag_end", "second negative") else 2
    assert rows == ([(images, 2 * images), (images, images)] if cfg > 1 else [(images, 2 * images)]) * 2
    expected = classic_latents(classic, prompt, cfg, **kw)
    if cfg > 1:
        assert stock_gap < 1e-12
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    else:
        assert stock_gap == 0 and torch.equal(got, expected)
    assert (got - modular_latents(modular, prompt)).abs().max() > 1e-4  # NAG acted


def test_stock_reproduced_and_remove_nag_exact():
    _, modular = pipelines()
    stock = modular_latents(modular, "a red cat", 5.0)
    blocks = modular._blocks
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat"), stock)
    assert torch.equal(modular_latents(modular, "a red cat", nag_negative_prompt="x", nag_scale=1.0), stock)
    same = modular_latents(modular, "a red cat", nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
    remove_nag(modular)
    assert modular._blocks is blocks and state_of(modular.transformer) is None
    assert torch.equal(modular_latents(modular, "a red cat"), stock)


def test_bad_input_gets_the_classic_errors():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    modular.update_components(guider=modular_toy.cfg(1.0))

    def both(error, match=None, prompt="a red cat", **kw):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, 1.0, **kw),
                               lambda: modular_latents(modular, prompt, **kw), match)

    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    both(TypeError, "nag_negative_prompt", nag_negative_prompt=3)
    both(ValueError, "nag_scale", nag_negative_prompt="x", nag_scale=0.5)
    embeds = torch.zeros(2, 3, 3, dtype=torch.float64)
    both(ValueError, None, prompt=["a", "b", "c"], nag_negative_prompt_embeds=embeds,
         nag_negative_pooled_prompt_embeds=embeds[:, 0])
