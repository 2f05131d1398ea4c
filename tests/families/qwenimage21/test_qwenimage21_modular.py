"""apply_nag on Qwen-Image 2.1's modular blocks (QwenImage21AutoBlocks with its CFG guider on and off,
QwenImage21TurboAutoBlocks without a guider; text-to-image and with a condition image), with the modular table entry
this family needs (``MODULAR_SPEC``, added to ``integrations.modular.SPECS`` for the test: that table is the core's):
bit-identical to the classic QwenImage21Pipeline from the same components with NAG (nag_end, batches with
num_images_per_prompt), the KV cache of each guidance batch on (the blocks' default), NAG on the conditional pass
only, the stock blocks reproduced without NAG arguments, remove_nag exact."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import qwenimage21_toy as toy  # first: it skips this module on a diffusers without Qwen-Image 2.1
import modular_toy
from diffusers.modular_pipelines import QwenImage21AutoBlocks, QwenImage21TurboAutoBlocks
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")


SIZE = 64
COMMON = dict(height=SIZE, width=SIZE, sigmas=[1.0, 0.7, 0.4])
PROMPT = "a red cat on a wooden chair"


def image():
    return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def negative(prompt):
    """The CFG negative prompt, one per prompt (the modular text-input step takes no single one for a batch)."""
    return ["trees"] * len(prompt) if isinstance(prompt, list) else "trees"


def classic_latents(pipe, prompt, cfg, **kw):
    extra = {"true_cfg_scale": cfg, "negative_prompt": negative(prompt)} if cfg else {}
    return pipe(prompt=prompt, generator=generator(), output_type="latent", output_resolution=SIZE, **COMMON, **extra,
                **kw).images


def modular_latents(pipe, prompt, cfg=None, **kw):
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg or 1.0))
        kw = {**kw, "negative_prompt": negative(prompt)} if cfg else kw
    with modular_toy.quiet():
        out = pipe(prompt=prompt, generator=generator(), output="latents", output_resolution=SIZE, **COMMON, **kw)
    return out.flatten(2).transpose(1, 2)  # [B, C, 1, H, W] -> the classic pipeline's packed [B, H * W, C]


def counting(model):
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]),
                                           with_kwargs=True, prepend=True)
    return rows, hook


CASES = {
    "one prompt": (PROMPT, dict(nag_negative_prompt="blurry dark")),
    "nag_end": (PROMPT, dict(nag_negative_prompt="blurry", nag_end=0.5, nag_scale=7.0)),
    "batch": ([PROMPT, "a dog"], dict(nag_negative_prompt=["blurry", "low quality"], num_images_per_prompt=2)),
    "condition image": (PROMPT, dict(nag_negative_prompt="blurry", image="image")),
}


@pytest.mark.parametrize("blocks", ["auto-cfg", "auto-no-cfg", "turbo"])
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_match_the_classic_pipeline(case, blocks):
    classic = toy.pipeline()
    cls, cfg = {"auto-cfg": (QwenImage21AutoBlocks, 3.0), "auto-no-cfg": (QwenImage21AutoBlocks, 0.0),
                "turbo": (QwenImage21TurboAutoBlocks, None)}[blocks]
    pipe = modular_toy.modular(cls, classic)
    prompt, kw = CASES[case]
    kw = {**kw, "image": image()} if "image" in kw else kw
    stock_kw = {k: v for k, v in kw.items() if not k.startswith("nag_")}
    stock = modular_latents(pipe, prompt, cfg, **stock_kw)
    torch.testing.assert_close(stock, classic_latents(classic, prompt, cfg, **stock_kw), rtol=0, atol=1e-12)
    apply_nag(classic, backend="torch")
    apply_nag(pipe, backend="torch")
    rows, hook = counting(pipe.transformer)
    got = modular_latents(pipe, prompt, cfg, **kw)
    hook.remove()
    expected = classic_latents(classic, prompt, cfg, **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - stock).abs().max() > 1e-5
    images = 4 if case == "batch" else 1
    # the NAG rows on the conditional pass only (past nag_end too: NAG's pre-hook then drops them, as on the classic)
    assert rows == ([2 * images, images] if cfg else [2 * images]) * 3, rows
    assert torch.equal(modular_latents(pipe, prompt, cfg, **stock_kw), stock)  # no NAG arguments: the stock blocks
    remove_nag(pipe)
    assert torch.equal(modular_latents(pipe, prompt, cfg, **stock_kw), stock)


def test_nag_guider_on_blocks_composed_by_hand_matches_the_classic_pipeline():
    from nag_kernels.integrations.guider import NAGGuidance
    from nag_kernels.integrations.modular import NAGTextEncoderStep

    classic = toy.pipeline()
    blocks = QwenImage21AutoBlocks()
    blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
    pipe = modular_toy.modular(None, classic, blocks=blocks)
    with modular_toy.quiet():
        pipe.update_components(guider=NAGGuidance(guidance_scale=3.0, nag_scale=5.0))
        got = pipe(prompt=PROMPT, negative_prompt="trees", nag_negative_prompt="blurry", generator=generator(),
                   output="latents", output_resolution=SIZE, **COMMON)
    apply_nag(classic, backend="torch")
    expected = classic_latents(classic, PROMPT, 3.0, nag_negative_prompt="blurry")
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-12)
