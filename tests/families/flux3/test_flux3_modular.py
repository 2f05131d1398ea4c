"""apply_nag on FLUX.3's modular blocks (Flux3AutoBlocks with its CFG guider on and off, Flux3DistilledAutoBlocks
without a guider), through the family's own modular declaration (``Family.modular``).

Against the float64 reference: the stock blocks run with the transformer's forward replaced by the 2B-layout reference
(``flux3_reference``), its conditional call given the NAG negative encoded by diffusers' own text encoding **on the
prompt's window** (``pad_multiple`` = ``max_sequence_length`` = the prompt's window: the exact meaning of the
family's pad / cut, ``flux3.fit_window``): CFG on and off, the distilled flow map, nag_end, images per prompt,
reference images, a negative longer (cut) or shorter (padded) than the prompt's window, pre-encoded negatives. NAG on
the conditional pass only, the stock blocks reproduced without NAG arguments and after remove_nag, NAGGuidance with a
hand-inserted NAG text-encoder step equal to apply_nag's blocks, the components manager's auto offload, bad input.
"""

from __future__ import annotations

import flux3_reference
import flux3_toy
import modular_toy
import pytest
import torch
from diffusers.modular_pipelines import (
    ComponentsManager,
    Flux3AutoBlocks,
    Flux3DistilledAutoBlocks,
)
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
from flux3_toy import float64_throughout  # noqa: F401  (fixture)
from modular_toy import generator
from nag_kernels.integrations import NAGGuidance, apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of
from nag_kernels.integrations.modular import NAGTextEncoderStep

pytestmark = pytest.mark.usefixtures("single_thread", "float64_throughout")


COMMON = dict(height=flux3_toy.SIZE, width=flux3_toy.SIZE, num_inference_steps=2)
NEGATIVE = "blurry dark low quality"
LONG = " ".join(["red blue sky snow fox bright sharp"] * 12)  # 84 words: a second 80-token window


def pipeline(blocks_cls=Flux3AutoBlocks, cfg: float | None = 3.5, manager=None):
    blocks = blocks_cls()
    for name in ("prompt_upsampler", "decode"):  # no Qwen3.5 upsampler, no VAE: the prompt as given, the latents
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline(components_manager=manager)
    components = flux3_toy.components(flow_map=blocks_cls is Flux3DistilledAutoBlocks)
    if blocks_cls is Flux3AutoBlocks:
        components["guider"] = modular_toy.cfg(cfg)
    with modular_toy.quiet():
        pipe.update_components(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, prompt="a cat", **kw):
    with modular_toy.quiet():
        return pipe(prompt=prompt, generator=generator(), output="latents", **{**COMMON, **kw})


def encode(pipe, text: str, window: int | None = None) -> torch.Tensor:
    """diffusers' FLUX.3 text encoding of ``text`` ([1, T, 128]): its own window (a multiple of 80), or ``window``
    tokens exactly (padded, or truncated)."""
    kw = {} if window is None else dict(max_sequence_length=window, pad_multiple=window)
    with torch.no_grad():
        return Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(pipe.text_encoder, pipe.tokenizer, text, **kw)


def reference_forward(model, negative, uncond=None, end=1.0, calls=None, **nag):
    """The transformer's forward for the stock blocks: the conditional call (text not ``uncond``) gets the NAG
    negative's rows while ``t >= (1 - end) * 1000`` and runs the reference computation."""

    def forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, image_cond_hidden_states=None,
                image_cond_ids=None, target_timestep=None, attention_kwargs=None, return_dict=True):
        text = encoder_hidden_states
        conditional = uncond is None or text.shape[1:] != uncond.shape[1:] or not torch.equal(text[:1], uncond[:1])
        if negative is not None and conditional and float(timestep[0]) * 1000 >= (1 - end) * 1000:
            text = torch.cat([text, negative.expand(text.shape[0], -1, -1).to(text.dtype)])
        if calls is not None:
            calls.append(text.shape[0])
        out = flux3_reference.flux3_forward(model, hidden_states, text, timestep, img_ids, txt_ids,
                                            image_cond_hidden_states, image_cond_ids, target_timestep, **nag)
        return (out,)

    return forward


def expected(pipe, negative, prompt="a cat", uncond=None, end=1.0, **kw):
    pipe.transformer.forward = reference_forward(pipe.transformer, negative, uncond, end)
    try:
        return latents(pipe, prompt, **kw)
    finally:
        del pipe.transformer.forward


def counting(model):
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]),
                                           with_kwargs=True, prepend=True)
    return rows, hook


def cond_latents(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, flux3_toy.CHANNELS, 2, 2, generator=g, dtype=torch.float64)]


CASES = {
    "one prompt": ("a cat", dict(nag_negative_prompt=NEGATIVE)),
    "nag_end": ("a cat", dict(nag_negative_prompt=NEGATIVE, nag_end=0.5, nag_scale=7.0)),
    "images per prompt": ("a cat", dict(nag_negative_prompt=NEGATIVE, num_images_per_prompt=2)),
    "negative cut": ("a cat", dict(nag_negative_prompt=LONG)),
    "negative padded": (LONG, dict(nag_negative_prompt=NEGATIVE)),
    "reference image": ("a cat", dict(nag_negative_prompt=NEGATIVE, image_cond_latents=cond_latents())),
}


@pytest.mark.parametrize("cfg", [3.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_auto_blocks_match_the_reference(case, cfg):
    pipe = pipeline(cfg=cfg)
    prompt, kw = CASES[case]
    settings = {k: kw.pop(k) for k in ("nag_end", "nag_scale") if k in kw}
    cfg_kw = dict(negative_prompt="ugly noisy") if cfg > 1 else {}
    stock = latents(pipe, prompt, **cfg_kw, **{k: v for k, v in kw.items() if k != "nag_negative_prompt"})
    window = encode(pipe, prompt).shape[1]
    negative = encode(pipe, kw["nag_negative_prompt"], window)
    uncond = encode(pipe, "ugly noisy") if cfg > 1 else None
    nag = {"nag_scale": settings.get("nag_scale", 5.0)}
    pipe.transformer.forward = reference_forward(pipe.transformer, negative, uncond, settings.get("nag_end", 1.0),
                                                 **nag)
    try:
        want = latents(pipe, prompt, **cfg_kw, **{k: v for k, v in kw.items() if k != "nag_negative_prompt"})
    finally:
        del pipe.transformer.forward
    apply_nag(pipe, backend="torch")
    assert pipe.__dict__["_nag_config"].scale == 5.0  # the family's recommended settings
    rows, hook = counting(pipe.transformer)
    got = latents(pipe, prompt, **cfg_kw, **kw, **settings)
    hook.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    images = kw.get("num_images_per_prompt", 1)
    if case != "nag_end":
        assert rows == ([2 * images, images] if cfg > 1 else [2 * images]) * 2  # NAG on the conditional pass only
    assert (got - stock).abs().max() > 1e-6  # NAG acts
    remove_nag(pipe)
    assert state_of(pipe.transformer) is None


@pytest.mark.parametrize("case", ["one prompt", "images per prompt", "negative padded", "reference image"])
def test_distilled_blocks_match_the_reference(case):
    # The step-distilled flow map runs without CFG: NAG is its only negative prompt.
    pipe = pipeline(Flux3DistilledAutoBlocks)
    prompt, kw = CASES[case]
    plain = {k: v for k, v in kw.items() if k != "nag_negative_prompt"}
    stock = latents(pipe, prompt, **plain)
    negative = encode(pipe, kw["nag_negative_prompt"], encode(pipe, prompt).shape[1])
    pipe.transformer.forward = reference_forward(pipe.transformer, negative)
    try:
        want = latents(pipe, prompt, **plain)
    finally:
        del pipe.transformer.forward
    apply_nag(pipe, backend="torch")
    got = latents(pipe, prompt, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert (got - stock).abs().max() > 1e-6  # NAG acts
    assert torch.equal(latents(pipe, prompt, **plain), stock)  # no NAG arguments: the stock blocks
    remove_nag(pipe)
    assert torch.equal(latents(pipe, prompt, **plain), stock)


@pytest.mark.parametrize("blocks_cls", [Flux3AutoBlocks, Flux3DistilledAutoBlocks])
def test_stock_without_nag_arguments_and_after_remove_nag(blocks_cls):
    pipe = pipeline(blocks_cls)
    kw = dict(negative_prompt="ugly noisy") if blocks_cls is Flux3AutoBlocks else {}
    stock = latents(pipe, **kw)
    stock_images = latents(pipe, num_images_per_prompt=2, **kw)
    apply_nag(pipe, backend="torch")
    assert torch.equal(latents(pipe, **kw), stock)
    assert torch.equal(latents(pipe, num_images_per_prompt=2, **kw), stock_images)
    assert torch.equal(latents(pipe, nag_scale=1.0, nag_negative_prompt=NEGATIVE, **kw), stock)  # NAG off
    remove_nag(pipe)
    assert state_of(pipe.transformer) is None and "_nag_original_blocks" not in pipe.__dict__
    assert torch.equal(latents(pipe, **kw), stock)


def test_negative_equal_to_the_prompt_reproduces_the_stock_blocks():
    pipe = pipeline(Flux3DistilledAutoBlocks)
    stock = latents(pipe, "a red cat")
    apply_nag(pipe, backend="torch")
    torch.testing.assert_close(latents(pipe, "a red cat", nag_negative_prompt="a red cat"), stock, rtol=0, atol=1e-12)


def test_pre_encoded_negative_of_any_window():
    pipe = pipeline(Flux3DistilledAutoBlocks)
    apply_nag(pipe, backend="torch")
    want = latents(pipe, LONG, nag_negative_prompt=NEGATIVE)  # the prompt's window: 160 tokens
    for embeds in (encode(pipe, NEGATIVE), encode(pipe, NEGATIVE, 160)):  # its own window (80, padded), or 160
        torch.testing.assert_close(latents(pipe, LONG, nag_negative_prompt_embeds=embeds), want, rtol=0,
                                   atol=1e-12)


def test_nag_guidance_with_the_nag_text_encoder_step_composed_by_hand():
    # NAGGuidance joins the NAG rows in its own conditional batch (the guider inputs: core change 2 only).
    applied = pipeline(cfg=3.5)
    apply_nag(applied, backend="torch")
    kw = dict(negative_prompt="ugly noisy", nag_negative_prompt=NEGATIVE)
    want = latents(applied, **kw)
    blocks = Flux3AutoBlocks()
    for name in ("prompt_upsampler", "decode"):
        blocks.sub_blocks.pop(name)
    blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
    pipe = blocks.init_pipeline()
    with modular_toy.quiet():
        pipe.update_components(**{**applied.components, "guider": NAGGuidance(guidance_scale=3.5)})
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(latents(pipe, **kw), want, rtol=0, atol=1e-12)


def test_components_manager_auto_offload(monkeypatch):
    # The CPU has no memory query (diffusers asks torch.accelerator): give it one, so that the manager installs its
    # hooks and moves the models to the "execution device" around each forward.
    from diffusers.utils import torch_utils

    monkeypatch.setattr(torch_utils.TorchDeviceBackend, "mem_get_info", lambda self: (2**36, 2**36), raising=False)
    manager = ComponentsManager()
    pipe = pipeline(Flux3DistilledAutoBlocks, manager=manager)
    stock = latents(pipe)
    apply_nag(pipe, backend="torch")
    want = latents(pipe, nag_negative_prompt=NEGATIVE)
    manager.enable_auto_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after the hooks moved the models
        assert torch.equal(latents(pipe, nag_negative_prompt=NEGATIVE), want)
    assert torch.equal(latents(pipe), stock)
    manager.disable_auto_cpu_offload()


def test_bad_nag_arguments_name_the_argument():
    pipe = pipeline(Flux3DistilledAutoBlocks)
    apply_nag(pipe, backend="torch")
    with modular_toy.quiet():
        with pytest.raises(ValueError, match="nag_scale"):
            latents(pipe, nag_negative_prompt=NEGATIVE, nag_scale=0.5)
        with pytest.raises(TypeError, match="nag_negative_prompt must be a str"):
            latents(pipe, nag_negative_prompt=3)
        with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1"):
            latents(pipe, nag_negative_prompt=["blurry", "dark"])
        with pytest.raises(ValueError, match=r"nag_negative_prompt_embeds must be \[batch, tokens, 128\]"):
            latents(pipe, nag_negative_prompt_embeds=torch.zeros(1, 80, 64))
        with pytest.raises(ValueError, match="give either nag_negative_prompt or nag_negative_prompt_embeds"):
            latents(pipe, nag_negative_prompt="x", nag_negative_prompt_embeds=torch.zeros(1, 80, 128))


@pytest.mark.parametrize("blocks_cls", [Flux3AutoBlocks, Flux3DistilledAutoBlocks])
def test_nag_acts_on_both_block_sets(blocks_cls):
    pipe = pipeline(blocks_cls)
    stock = latents(pipe)
    apply_nag(pipe, backend="torch")
    assert (latents(pipe, nag_negative_prompt=NEGATIVE) - stock).abs().max() > 1e-6
