"""apply_nag on FLUX.2's modular blocks: Flux2KleinAutoBlocks (distilled, no guider), Flux2KleinBaseAutoBlocks (CFG
guider) and Flux2AutoBlocks ([dev], no guider; its Mistral encoder stood in for by a deterministic function of the
text in both pipelines): bit-identical to the classic pipelines from the same components with NAG (CFG on and off
where the blocks have a guider, nag_end, batches, a reference image), the stock pipeline reproduced, remove_nag
exact, the classic errors.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from diffusers.modular_pipelines import Flux2AutoBlocks, Flux2KleinAutoBlocks, Flux2KleinBaseAutoBlocks

import flux2_toy
import modular_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=flux2_toy.SEQ_LEN,
              text_encoder_out_layers=flux2_toy.LAYERS)


def _image(seed, size=64):  # FLUX.2's image processor takes 64 px and more
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def classic_latents(pipe, prompt, cfg=None, **kw):
    extra = {} if cfg is None else {"guidance_scale": cfg}
    return pipe(prompt=prompt, generator=generator(), output_type="latent", **COMMON, **extra, **kw).images


def modular_latents(pipe, classic, prompt, cfg=None, **kw):
    """The modular pipeline's denoised latents, in the classic pipeline's latent output form (batch-norm statistics
    applied, unpatchified: what its decode step does before the VAE)."""
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg))
    with modular_toy.quiet():
        latents = pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)
    bn = classic.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + classic.vae.config.batch_norm_eps).to(latents.dtype)
    return classic._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1).to(latents.dtype))


CASES = {
    "one prompt": ("a cat", dict(nag_negative_prompt="blurry, watermark")),
    "nag_end": ("a cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "batch": (["a cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly"], num_images_per_prompt=2)),
    "reference image": ("a cat", dict(nag_negative_prompt="blurry", image=_image(1))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_klein_matches_classic(case):
    classic = flux2_toy.klein()
    modular = modular_toy.modular(Flux2KleinAutoBlocks, classic)
    stock = modular_latents(modular, classic, "a cat")
    apply_nag(classic)
    apply_nag(modular)
    prompt, kw = CASES[case]
    got = modular_latents(modular, classic, prompt, **kw)
    assert torch.equal(got, classic_latents(classic, prompt, **kw))
    assert torch.equal(modular_latents(modular, classic, "a cat"), stock)
    remove_nag(modular)
    assert state_of(modular.transformer) is not None  # the classic pipeline's
    remove_nag(classic)
    assert state_of(modular.transformer) is None and torch.equal(modular_latents(modular, classic, "a cat"), stock)


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", ["one prompt", "nag_end", "batch"])
def test_klein_base_matches_classic(case, cfg):
    classic = flux2_toy.klein(distilled=False)
    modular = modular_toy.modular(Flux2KleinBaseAutoBlocks, classic)
    apply_nag(classic)
    apply_nag(modular)
    prompt, kw = CASES[case]
    rows = []
    hook = modular.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True, prepend=True)
    got = modular_latents(modular, classic, prompt, cfg, **kw)
    hook.remove()
    images = 4 if case == "batch" else 1
    assert rows == ([2 * images, images] if cfg > 1 else [2 * images]) * 2  # NAG on the conditional pass only
    assert torch.equal(got, classic_latents(classic, prompt, cfg, **kw))


def _dev_encoder(monkeypatch):
    """FLUX.2 [dev]'s Mistral encoder stood in for, in the classic pipeline and the modular text-encoder step alike,
    by a deterministic function of each prompt (as test_flux2_pipeline does for the classic pipeline)."""
    from diffusers.modular_pipelines.flux2.encoders import Flux2TextEncoderStep

    def embed(prompt):
        rows = []
        for text in [prompt] if isinstance(prompt, str) else prompt:
            g = torch.Generator().manual_seed(sum(map(ord, text)))
            rows.append(torch.randn(1, flux2_toy.SEQ_LEN, flux2_toy.TEXT_DIM, generator=g, dtype=torch.float64))
        return torch.cat(rows)

    monkeypatch.setattr(Flux2TextEncoderStep, "_get_mistral_3_prompt_embeds",
                        staticmethod(lambda text_encoder=None, tokenizer=None, prompt=None, **_: embed(prompt)))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_toy.vae(), text_encoder=None,
                         tokenizer=None, transformer=flux2_toy.transformer(guidance=True)).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    pipe._get_mistral_3_small_prompt_embeds = lambda prompt, **_: embed(prompt)
    return pipe


@pytest.mark.parametrize("case", ["one prompt", "nag_end", "batch"])
def test_dev_matches_classic(case, monkeypatch):
    classic = _dev_encoder(monkeypatch)
    modular = modular_toy.modular(Flux2AutoBlocks, classic)
    apply_nag(classic)
    apply_nag(modular)
    prompt, kw = CASES[case]
    with modular_toy.quiet():
        raw = modular(prompt=prompt, generator=generator(), output="latents", guidance_scale=4.0, **COMMON, **kw)
    assert torch.equal(classic._pack_latents(raw), classic_latents(classic, prompt, 4.0, **kw))  # packed, as its output


def test_bad_input_gets_the_classic_errors():
    classic = flux2_toy.klein()
    modular = modular_toy.modular(Flux2KleinAutoBlocks, classic)
    apply_nag(classic)
    apply_nag(modular)

    def both(error, match=None, prompt="a cat", **kw):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, **kw),
                               lambda: modular_latents(modular, classic, prompt, **kw), match)

    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    both(ValueError, "nag_tau", nag_negative_prompt="x", nag_tau=-1.0)
    embeds = torch.zeros(1, flux2_toy.SEQ_LEN, 3, dtype=torch.float64)
    both(ValueError, "per-row shape", nag_negative_prompt_embeds=embeds)
