"""apply_nag on Qwen-Image's modular blocks (QwenImageAutoBlocks, CFG guider): bit-identical to the classic pipelines
from the same components with CFG on and off, nag_end < 1, batches and img2img; NAG only on the conditional pass,
the guider and its settings kept (any guider), the stock modular pipeline reproduced, remove_nag exact, the classic
errors.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.modular_pipelines import QwenImageAutoBlocks

import modular_toy
import qwenimage_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2)


def pipelines(cls=QwenImagePipeline):
    classic = qwenimage_toy.pipeline(cls)
    return classic, modular_toy.modular(QwenImageAutoBlocks, classic)


def classic_latents(pipe, prompt, cfg, negative_prompt=None, **kw):
    if cfg > 1:
        kw = {**kw, "negative_prompt": negative_prompt, "true_cfg_scale": cfg}
    packed = pipe(prompt=prompt, generator=generator(), output_type="latent", **COMMON, **kw).images
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)


def modular_latents(pipe, prompt, cfg=None, **kw):
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg))
    with modular_toy.quiet():
        return pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)


def _image(seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


CASES = {
    "negative longer than the prompt": ("a red cat", dict(nag_negative_prompt="blurry, ugly and watermarked")),
    "nag_end": ("a red cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "prompts": (["a red cat", "green trees in the rain"], dict(nag_negative_prompt=["blurry", "a dog"])),
    "images per prompt": ("a red cat", dict(nag_negative_prompt="blurry", num_images_per_prompt=2)),
}


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, cfg):
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    prompt, kw = CASES[case]
    negative = "trees" if isinstance(prompt, str) else ["trees", "a cat"]
    expected = classic_latents(classic, prompt, cfg, negative, **kw)
    got = modular_latents(modular, prompt, cfg, negative_prompt=negative, **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(got, modular_latents(modular, prompt, negative_prompt=negative))


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_img2img(cfg):
    """The img2img workflow of the same blocks. (The stock modular and classic img2img pipelines draw their noise
    differently on diffusers 0.42.1, so there is no classic comparison here: the stock modular one is the reference.)"""
    _, modular = pipelines(QwenImageImg2ImgPipeline)
    kw = dict(image=_image(1), strength=0.9)
    stock = modular_latents(modular, "a red cat", cfg, negative_prompt="trees", **kw)
    apply_nag(modular)
    rows = []
    hook = modular.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True, prepend=True)
    guided = modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="blurry", **kw)
    hook.remove()
    assert rows == ([2, 1] if cfg > 1 else [2]) * 2 and not torch.equal(guided, stock)
    assert torch.equal(modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="blurry",
                                       nag_scale=1.0, **kw), stock)


def test_only_the_conditional_pass_is_guided_and_the_guider_is_kept():
    _, modular = pipelines()
    guider = modular_toy.cfg(4.0, guidance_rescale=0.3)
    modular.update_components(guider=guider)
    config = dict(guider.config)
    apply_nag(modular)
    assert modular.guider is guider and dict(guider.config) == config
    rows = []
    hook = modular.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append((k["hidden_states"].shape[0], k["encoder_hidden_states"].shape[0])),
        with_kwargs=True, prepend=True)
    modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="blurry")
    hook.remove()
    assert rows == [(1, 2), (1, 1)] * 2  # per step: conditional pass 2B text rows, unconditional pass B
    remove_nag(modular)
    assert modular.guider is guider and dict(guider.config) == config


def test_other_guiders():
    _, modular = pipelines()
    with modular_toy.quiet():
        modular.update_components(guider=AdaptiveProjectedGuidance(guidance_scale=4.0))
    stock = modular_latents(modular, "a red cat", negative_prompt="trees")
    apply_nag(modular)
    assert isinstance(modular.guider, AdaptiveProjectedGuidance)
    guided = modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="blurry")
    assert not torch.equal(guided, stock)
    assert torch.equal(modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="blurry",
                                       nag_scale=1.0), stock)


def test_pre_encoded_negative_and_rows_in_the_embeddings_order():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    embeds, mask = classic.encode_prompt("blurry, ugly and watermarked")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    kw = dict(nag_negative_prompt_embeds=embeds, nag_negative_prompt_embeds_mask=mask)
    expected = classic_latents(classic, "a red cat", 4.0, "trees", **kw)
    assert torch.equal(modular_latents(modular, "a red cat", 4.0, negative_prompt="trees", **kw), expected)
    # Several prompts and images per prompt: diffusers' Qwen-Image pipelines repeat a prompt's mask in another row
    # order than its embeddings (mask.repeat(1, n, 1) on a 2-D mask); the classic NAG encodes its negative with the
    # same encode_prompt, so its NAG mask rows inherit that order. The modular NAG rows follow the embeddings' order.
    inputs = []
    hook = modular.transformer.register_forward_pre_hook(lambda m, a, k: inputs.append(k), with_kwargs=True)
    modular_latents(modular, ["a red cat", "a dog"], 1.0, nag_negative_prompt=["blurry", "a much longer negative"],
                    num_images_per_prompt=2)
    hook.remove()
    lengths = inputs[0]["encoder_hidden_states_mask"].sum(1)[4:].tolist()
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3] and lengths[0] < lengths[2]


def test_stock_reproduced_and_remove_nag_exact():
    _, modular = pipelines()
    stock = modular_latents(modular, "a red cat", 4.0, negative_prompt="trees")
    blocks = modular._blocks
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat", negative_prompt="trees"), stock)
    assert torch.equal(modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="x",
                                       nag_scale=1.0), stock)
    same = modular_latents(modular, "a red cat", negative_prompt="trees", nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-12)
    remove_nag(modular)
    assert modular._blocks is blocks and state_of(modular.transformer) is None
    assert torch.equal(modular_latents(modular, "a red cat", negative_prompt="trees"), stock)


def test_bad_input_gets_the_classic_errors():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    embeds, mask = classic.encode_prompt("x")

    def both(error, match=None, **kw):
        modular_toy.same_error(error, lambda: classic_latents(classic, "a red cat", 1.0, **kw),
                               lambda: modular_latents(modular, "a red cat", 1.0, **kw), match)

    both(ValueError, "together", nag_negative_prompt_embeds_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    both(TypeError, "torch.Tensor", nag_negative_prompt_embeds=embeds.tolist(), nag_negative_prompt_embeds_mask=mask)
    both(ValueError, "width", nag_negative_prompt_embeds=embeds[..., :8],
         nag_negative_prompt_embeds_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    both(ValueError, "nag_end", nag_negative_prompt="x", nag_end=1.5)


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit-plus"])
def test_edit_blocks_match_classic(plus, cfg, monkeypatch):
    """QwenImageEditAutoBlocks / QwenImageEditPlusAutoBlocks against QwenImageEditPipeline / QwenImageEditPlusPipeline
    (test_qwenimage_edit's tiny vision-language encoder): the NAG negative is encoded with the reference image by the
    edit blocks' own VL text encoder, as the classic pipelines encode it. The 32 x 32 image kept as it is in both."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from diffusers.modular_pipelines import QwenImageEditAutoBlocks, QwenImageEditPlusAutoBlocks
    from diffusers.modular_pipelines.qwenimage import encoders
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    import test_qwenimage_edit

    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "calculate_dimensions", lambda area, ratio: (32, 32))
    monkeypatch.setattr(encoders, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    cls, blocks = (QwenImageEditPlusPipeline, QwenImageEditPlusAutoBlocks) if plus else (QwenImageEditPipeline,
                                                                                          QwenImageEditAutoBlocks)
    classic = test_qwenimage_edit.pipeline(cls)
    modular = modular_toy.modular(blocks, classic)
    apply_nag(classic)
    apply_nag(modular)
    kw = dict(image=_image(1), nag_negative_prompt="blurry, watermark")
    got = modular_latents(modular, "a red cat", cfg, negative_prompt="trees", **kw)
    assert torch.equal(got, classic_latents(classic, "a red cat", cfg, "trees", **kw))
    assert not torch.equal(got, modular_latents(modular, "a red cat", negative_prompt="trees", image=_image(1)))
