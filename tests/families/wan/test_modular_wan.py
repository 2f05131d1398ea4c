"""apply_nag on Wan's modular blocks (WanBlocks, Wan22Blocks with two experts and two guiders,
WanImage2VideoAutoBlocks, Wan22Image2VideoBlocks, Wan22VaceBlocks): bit-identical to the classic pipelines from the
same components with CFG on and off and nag_end < 1, in float32 (the modular scheduler step runs in float32, so the
stock modular and classic pipelines differ in float64). Stock modular Wan cannot run with CFG off on diffusers
0.42.1 (its text-encoder step fails without unconditional embeddings); NAG with CFG off (distilled Wan) works, and
remove_nag restores the stock blocks, failure included.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import WanPipeline
from diffusers.modular_pipelines import (
    Wan22Blocks,
    Wan22Image2VideoBlocks,
    Wan22VaceBlocks,
    WanBlocks,
    WanImage2VideoAutoBlocks,
)

import modular_toy
import test_wan_pipelines
import wan_toy
from modular_toy import generator
from nag_kernels.integrations import NAGGuidance, apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of
from nag_kernels.integrations.modular import NAGTextEncoderStep

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES, num_inference_steps=2,
              max_sequence_length=wan_toy.SEQ_LEN)


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """The Wan blocks clean prompts with ftfy, which this environment lacks: an identity stand-in (the classic
    pipelines skip it without ftfy; test_wan_pipelines' fixture covers theirs)."""
    from diffusers.modular_pipelines.wan import encoders
    from diffusers.pipelines.wan import pipeline_wan_i2v, pipeline_wan_vace

    for module in (encoders, pipeline_wan_i2v, pipeline_wan_vace):
        if not hasattr(module, "ftfy"):
            monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _t2v():
    return wan_toy.pipeline(WanPipeline, dtype=torch.float32), {}


def _t2v_two_experts():
    return wan_toy.pipeline(WanPipeline, dtype=torch.float32, two_experts=True), {}


def _from(make):
    def build():
        pipe, extra = make()
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dtype=torch.float32), extra
    return build


CASES = {  # name: (classic pipeline and its extra call arguments, modular blocks, the blocks' boundary_ratio)
    "t2v": (_t2v, WanBlocks, None),
    "t2v-2.2-two-experts": (_t2v_two_experts, Wan22Blocks, 0.5),
    "i2v-2.1": (_from(test_wan_pipelines._i2v_21), WanImage2VideoAutoBlocks, None),
    "i2v-2.2": (_from(test_wan_pipelines._i2v_22), Wan22Image2VideoBlocks, 0.0),
    "vace-2.2": (_from(test_wan_pipelines._vace), Wan22VaceBlocks, 0.0),
}


def pipelines(case):
    make, blocks, boundary = CASES[case]
    classic, extra = make()
    modular = modular_toy.modular(blocks, classic)
    if boundary is not None:
        modular.update_components(boundary_ratio=boundary)  # the classic toy's (Wan 2.2 A14B: 0.875 by default)
    return classic, modular, {**COMMON, **extra}


def set_cfg(modular, scale):
    modular.update_components(guider=modular_toy.cfg(scale))
    if "guider_2" in modular._component_specs:
        modular.update_components(guider_2=modular_toy.cfg(scale))


def classic_latents(pipe, prompt, cfg, kw, **nag):
    extra = {"guidance_scale_2": cfg} if getattr(pipe, "transformer_2", None) is not None else {}
    return pipe(prompt=prompt, negative_prompt="trees", guidance_scale=cfg, generator=generator(),
                output_type="latent", **kw, **extra, **nag).frames


def modular_latents(pipe, prompt, kw, **nag):
    with modular_toy.quiet():
        return pipe(prompt=prompt, negative_prompt="trees", generator=generator(), output="latents", **kw, **nag)


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, cfg):
    classic, modular, kw = pipelines(case)
    apply_nag(classic)
    apply_nag(modular)
    set_cfg(modular, cfg)
    for nag in (dict(nag_negative_prompt="blurry dog"), dict(nag_negative_prompt="blurry dog", nag_end=0.5)):
        expected = classic_latents(classic, "a red cat", cfg, kw, **nag)
        assert torch.equal(modular_latents(modular, "a red cat", kw, **nag), expected), nag
    if cfg > 1:
        assert torch.equal(modular_latents(modular, "a red cat", kw), classic_latents(classic, "a red cat", cfg, kw))


def test_batches_and_both_experts_guided():
    classic, modular, kw = pipelines("t2v-2.2-two-experts")
    apply_nag(classic)
    apply_nag(modular)
    set_cfg(modular, 1.0)
    prompts, nag = ["a red cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly"], num_videos_per_prompt=2)
    calls = []
    def record(index):
        return lambda m, a, k: calls.append((index, k["encoder_hidden_states"].shape[0]))

    hooks = [model.register_forward_pre_hook(record(i), with_kwargs=True, prepend=True)
             for i, model in enumerate((modular.transformer, modular.transformer_2))]
    got = modular_latents(modular, prompts, kw, **nag)
    for hook in hooks:
        hook.remove()
    assert calls == [(0, 8), (1, 8)]  # 4 videos: 8 text rows, the high-noise then the low-noise expert
    extra = {"negative_prompt": ["trees", "trees"]}
    expected = classic(prompt=prompts, guidance_scale=1.0, guidance_scale_2=1.0, generator=generator(),
                       output_type="latent", **kw, **extra, **nag).frames
    assert torch.equal(got, expected)


def test_cfg_off_needs_nag_and_remove_nag_restores_the_stock_blocks():
    classic, modular, kw = pipelines("t2v")
    set_cfg(modular, 1.0)
    with pytest.raises(UnboundLocalError):  # diffusers 0.42.1: WanTextEncoderStep without unconditional embeddings
        modular_latents(modular, "a red cat", kw)
    set_cfg(modular, 5.0)
    stock = modular_latents(modular, "a red cat", kw)
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, "a red cat", kw), stock)
    assert torch.equal(modular_latents(modular, "a red cat", kw, nag_negative_prompt="x", nag_scale=1.0), stock)
    same = modular_latents(modular, "a red cat", kw, nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)  # float32
    set_cfg(modular, 1.0)
    expected = classic_latents(classic, "a red cat", 1.0, kw)
    assert torch.equal(modular_latents(modular, "a red cat", kw), expected)  # CFG off without NAG runs while applied
    remove_nag(modular)
    assert state_of(modular.transformer) is None
    with pytest.raises(UnboundLocalError):
        modular_latents(modular, "a red cat", kw)
    set_cfg(modular, 5.0)
    assert torch.equal(modular_latents(modular, "a red cat", kw), stock)


def test_nag_guidance_on_two_experts():
    """Composed by hand: the NAG text-encoder step and a NAGGuidance per expert (Wan 2.2's guider and guider_2)."""
    classic, _, kw = pipelines("t2v-2.2-two-experts")
    blocks = Wan22Blocks()
    blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
    hand = modular_toy.modular(None, classic, blocks=blocks)
    hand.update_components(boundary_ratio=0.5)
    with modular_toy.quiet():
        hand.update_components(guider=NAGGuidance(guidance_scale=5.0, nag_scale=9.0),
                               guider_2=NAGGuidance(guidance_scale=5.0, nag_scale=9.0))
    apply_nag(classic, nag_scale=9.0)
    expected = classic_latents(classic, "a red cat", 5.0, kw, nag_negative_prompt="blurry dog")
    assert torch.equal(modular_latents(hand, "a red cat", kw, nag_negative_prompt="blurry dog"), expected)
    remove_nag(hand)
    assert state_of(hand.transformer) is not None  # the classic pipeline still has NAG applied
    remove_nag(classic)
    assert state_of(hand.transformer) is None and state_of(hand.transformer_2) is None


def test_bad_input_gets_the_classic_errors():
    classic, modular, kw = pipelines("t2v")
    apply_nag(classic)
    apply_nag(modular)
    set_cfg(modular, 1.0)

    def both(error, match=None, prompt="a red cat", **nag):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, 1.0, kw, **nag),
                               lambda: modular_latents(modular, prompt, kw, **nag), match)

    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    both(TypeError, "nag_negative_prompt", nag_negative_prompt=3)
    embeds = torch.zeros(1, wan_toy.SEQ_LEN + 1, wan_toy.TEXT_DIM)
    both(ValueError, "per-row shape", nag_negative_prompt_embeds=embeds)
