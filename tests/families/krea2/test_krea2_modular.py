"""apply_nag on Krea 2's modular blocks (Krea2AutoBlocks with its CFG guider on and off, Krea2TurboAutoBlocks without
a guider), through the family's own modular declaration (``Family.modular``): bit-identical to the classic Krea2Pipeline from the same components with NAG
(nag_end, batches with num_images_per_prompt), NAG on the conditional pass only, the stock blocks reproduced without
NAG arguments, remove_nag exact."""

from __future__ import annotations

import pytest
import torch
from diffusers.modular_pipelines import Krea2AutoBlocks, Krea2TurboAutoBlocks

import krea2_toy
import modular_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")


COMMON = dict(height=krea2_toy.SIZE, width=krea2_toy.SIZE, num_inference_steps=2,
              max_sequence_length=krea2_toy.SEQ_LEN)


def classic_latents(pipe, prompt, cfg, **kw):
    latents = pipe(prompt=prompt, guidance_scale=cfg, generator=generator(), output_type="latent", **COMMON,
                   **kw).images
    return pipe._unpack_latents(latents, COMMON["height"], COMMON["width"])


def modular_latents(pipe, prompt, cfg=None, **kw):
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg, use_original_formulation=True))
    with modular_toy.quiet():
        return pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)


def counting(model):
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]),
                                           with_kwargs=True, prepend=True)
    return rows, hook


CASES = {
    "one prompt": ("a cat", dict(nag_negative_prompt="blurry dark")),
    "nag_end": ("a cat", dict(nag_negative_prompt="blurry", nag_end=0.5, nag_scale=7.0)),
    "batch": (["a cat", "a dog"], dict(nag_negative_prompt=["blurry", "low quality"], num_images_per_prompt=2)),
}


@pytest.mark.parametrize("cfg", [4.5, 0.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_auto_blocks_match_classic(case, cfg):
    classic = krea2_toy.pipeline(modular_taps=True)
    blocks = modular_toy.modular(Krea2AutoBlocks, classic)
    stock = modular_latents(blocks, "a cat", cfg)
    apply_nag(classic, backend="torch")
    apply_nag(blocks, backend="torch")
    prompt, kw = CASES[case]
    rows, hook = counting(blocks.transformer)
    got = modular_latents(blocks, prompt, cfg, **kw)
    hook.remove()
    images = 4 if case == "batch" else 1
    if case != "nag_end":
        assert rows == ([2 * images, images] if cfg else [2 * images]) * 2  # NAG on the conditional pass only
    assert torch.equal(got, classic_latents(classic, prompt, cfg, **kw))
    if case == "one prompt":
        assert (got - stock).abs().max() > 1e-6  # NAG acts
    assert torch.equal(modular_latents(blocks, "a cat", cfg), stock)  # no NAG arguments: the stock blocks
    remove_nag(blocks)
    assert state_of(blocks.transformer) is not None  # the classic pipeline's
    remove_nag(classic)
    assert state_of(blocks.transformer) is None and torch.equal(modular_latents(blocks, "a cat", cfg), stock)


@pytest.mark.parametrize("case", ["one prompt", "batch"])
def test_turbo_blocks_match_classic(case):
    classic = krea2_toy.pipeline(modular_taps=True, distilled=True)
    blocks = modular_toy.modular(Krea2TurboAutoBlocks, classic)
    stock = modular_latents(blocks, "a cat")
    apply_nag(classic, backend="torch")
    apply_nag(blocks, backend="torch")
    prompt, kw = CASES[case]
    assert blocks.__dict__["_nag_config"].scale == 5.0  # the recommended settings of the classic pipeline
    got = modular_latents(blocks, prompt, **kw)
    assert torch.equal(got, classic_latents(classic, prompt, 0.0, **kw))
    if case == "one prompt":
        assert (got - stock).abs().max() > 1e-6  # NAG acts: the turbo checkpoint's only negative prompt
    assert torch.equal(modular_latents(blocks, "a cat"), stock)
    remove_nag(blocks)
    remove_nag(classic)
    assert torch.equal(modular_latents(blocks, "a cat"), stock)
