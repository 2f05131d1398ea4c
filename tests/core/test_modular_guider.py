"""NAGGuidance (a diffusers guider) with the NAG text-encoder step, on Qwen-Image's modular blocks composed by hand:
the same latents as apply_nag's modular pipeline and the classic pipeline with NAG, CFG on (two passes, NAG on the
conditional one) and off (one pass); call settings over the guider's; enabled / no NAG step; saved and loaded with
the guider component and the pipeline; the denoiser patched on first use and unpatched by remove_nag; concurrent
calls over shared components keep their own settings.
"""

from __future__ import annotations

import os
import tempfile
import threading

import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.modular_pipelines import ComponentSpec, QwenImageAutoBlocks

import modular_toy
import qwenimage_toy
from modular_toy import generator
from nag_kernels.integrations import NAGGuidance, apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of
from nag_kernels.integrations.modular import NAGTextEncoderStep

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2)


def composed(classic, nag_step: bool = True, **guider):
    """QwenImageAutoBlocks with the NAG text-encoder step after its text encoder, and a NAGGuidance guider."""
    blocks = QwenImageAutoBlocks()
    if nag_step:
        blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
    pipe = modular_toy.modular(None, classic, blocks=blocks)
    if guider:
        with modular_toy.quiet():
            pipe.update_components(guider=NAGGuidance(**guider))
    return pipe


def run(pipe, prompt="a red cat", **kw):
    with modular_toy.quiet():
        return pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)


def classic_latents(pipe, prompt, cfg, **kw):
    if cfg > 1:
        kw = {**kw, "negative_prompt": "trees", "true_cfg_scale": cfg}
    packed = pipe(prompt, generator=generator(), output_type="latent", **COMMON, **kw).images
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)


def rows_of(pipe, **kw):
    rows = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[0]), with_kwargs=True, prepend=True)
    try:
        run(pipe, **kw)
    finally:
        hook.remove()
    return rows


@pytest.mark.parametrize("nag_end", [1.0, 0.5])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_composed_by_hand_matches_apply_nag_and_classic(cfg, nag_end):
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    hand = composed(classic, guidance_scale=cfg, nag_scale=5.0, nag_end=nag_end)
    applied = modular_toy.modular(QwenImageAutoBlocks, classic)
    applied.update_components(guider=modular_toy.cfg(cfg))
    apply_nag(applied, nag_scale=5.0, nag_end=nag_end)
    apply_nag(classic, nag_scale=5.0, nag_end=nag_end)
    kw = dict(negative_prompt="trees", nag_negative_prompt="blurry, ugly and watermarked")
    got = run(hand, **kw)
    assert torch.equal(got, run(applied, **kw))
    assert torch.equal(got, classic_latents(classic, "a red cat", cfg, nag_negative_prompt=kw["nag_negative_prompt"]))
    # the empty negative when none is given, as the authors'
    assert torch.equal(run(hand, negative_prompt="trees"),
                       run(applied, negative_prompt="trees", nag_negative_prompt=""))
    remove_nag(applied)
    remove_nag(classic)


def test_passes_and_call_settings():
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    hand = composed(classic, guidance_scale=4.0, nag_scale=5.0)
    assert rows_of(hand, negative_prompt="trees", nag_negative_prompt="x") == [2, 1, 2, 1]  # NAG on the conditional
    hand.update_components(guider=hand.guider.new(guidance_scale=1.0))
    assert rows_of(hand, nag_negative_prompt="x") == [2, 2]  # one pass
    inputs = [p.name for p in hand.blocks.inputs]
    assert {"nag_negative_prompt", "nag_negative_prompt_embeds", "nag_negative_prompt_embeds_mask", "nag_scale",
            "nag_tau", "nag_alpha", "nag_end"} <= set(inputs)
    # a call's settings over the guider's
    seven = run(hand, nag_negative_prompt="x", nag_scale=7.0, nag_alpha=0.5)
    with modular_toy.quiet():
        hand.update_components(guider=NAGGuidance(guidance_scale=1.0, nag_scale=7.0, nag_alpha=0.5))
    assert torch.equal(run(hand, nag_negative_prompt="x"), seven)
    assert not torch.equal(run(hand, nag_negative_prompt="x", nag_scale=3.0), seven)


def test_stock_when_off_and_without_the_nag_step():
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    stock_pipe = modular_toy.modular(QwenImageAutoBlocks, classic)
    stock_pipe.update_components(guider=modular_toy.cfg(4.0))
    stock = run(stock_pipe, negative_prompt="trees")
    hand = composed(classic, guidance_scale=4.0, nag_scale=1.0)
    assert torch.equal(run(hand, negative_prompt="trees", nag_negative_prompt="x"), stock)  # nag_scale 1: CFG
    hand = composed(classic, guidance_scale=4.0, nag_scale=5.0, enabled=False)
    stock_pipe.update_components(guider=modular_toy.cfg(4.0, enabled=False))
    assert torch.equal(run(hand, negative_prompt="trees", nag_negative_prompt="x"), run(stock_pipe))  # all off
    no_step = composed(classic, nag_step=False, guidance_scale=4.0, nag_scale=5.0)
    with pytest.warns(UserWarning, match="NAGTextEncoderStep"):
        out = no_step(prompt="a red cat", negative_prompt="trees", generator=generator(), output="latents", **COMMON)
    assert torch.equal(out, stock)


def test_the_denoiser_is_patched_on_first_use_and_remove_nag_unpatches_it():
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    hand = composed(classic, guidance_scale=1.0, nag_scale=5.0)
    stock_pipe = modular_toy.modular(QwenImageAutoBlocks, classic)
    stock_pipe.update_components(guider=modular_toy.cfg(1.0))
    stock = run(stock_pipe)
    assert state_of(hand.transformer) is None
    run(hand, nag_negative_prompt="x")
    assert state_of(hand.transformer) is not None
    remove_nag(hand)
    assert state_of(hand.transformer) is None
    assert torch.equal(run(stock_pipe), stock)


def test_apply_nag_with_a_nag_guider_adds_the_rows_once():
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    applied = modular_toy.modular(QwenImageAutoBlocks, classic)
    applied.update_components(guider=modular_toy.cfg(4.0))
    apply_nag(applied)
    expected = run(applied, negative_prompt="trees", nag_negative_prompt="x")
    with modular_toy.quiet():
        applied.update_components(guider=NAGGuidance(guidance_scale=4.0))
    assert rows_of(applied, negative_prompt="trees", nag_negative_prompt="x") == [2, 1, 2, 1]
    assert torch.equal(run(applied, negative_prompt="trees", nag_negative_prompt="x"), expected)


def test_saved_and_loaded_with_the_guider_component_and_the_pipeline():
    with modular_toy.quiet():
        guider = NAGGuidance(guidance_scale=3.0, nag_scale=6.0, nag_tau=2.0, nag_alpha=0.5, nag_end=0.5, stop=0.8)
    fields = ("guidance_scale", "nag_scale", "nag_tau", "nag_alpha", "nag_end", "start", "stop", "enabled",
              "guidance_rescale", "use_original_formulation")
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second, modular_toy.quiet():
        guider.save_pretrained(first)
        loaded = NAGGuidance.from_pretrained(first)
        assert type(loaded) is NAGGuidance and all(loaded.config[f] == guider.config[f] for f in fields)
        # as a pipeline component loaded from a repository folder, saved with the pipeline, loaded back
        spec = ComponentSpec(name="guider", type_hint=NAGGuidance, pretrained_model_name_or_path=first,
                             default_creation_method="from_pretrained")
        hand = composed(classic)
        hand.update_components(guider=spec.load())
        expected = run(hand, nag_negative_prompt="x")
        hand.save_pretrained(second, overwrite_modular_index=True)
        assert os.path.exists(os.path.join(second, "guider", "guider_config.json"))
        blocks = QwenImageAutoBlocks()
        blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
        reloaded = blocks.init_pipeline(second)
        reloaded.load_components(names=["guider"])
        assert type(reloaded.guider) is NAGGuidance
        assert all(reloaded.guider.config[f] == guider.config[f] for f in fields)
        reloaded.update_components(**{k: v for k, v in hand.components.items() if k != "guider" and v is not None})
        reloaded.set_progress_bar_config(disable=True)
        assert torch.equal(run(reloaded, nag_negative_prompt="x"), expected)


def test_bad_settings():
    for kw, match in ((dict(nag_scale=0.5), "nag_scale"), (dict(nag_tau=0.0), "nag_tau"),
                      (dict(nag_alpha=1.5), "nag_alpha"), (dict(nag_end=2.0), "nag_end")):
        with modular_toy.quiet(), pytest.raises(ValueError, match=match):
            NAGGuidance(**kw)


def test_concurrent_calls_keep_their_own_settings():
    """Two requests at once on two pipelines over the same components (each with its own NAG guider and settings)
    give what each gives alone."""
    classic = qwenimage_toy.pipeline(QwenImagePipeline)
    first = composed(classic, guidance_scale=4.0, nag_scale=3.0)
    second = composed(classic, guidance_scale=1.0, nag_scale=9.0)
    applied = modular_toy.modular(QwenImageAutoBlocks, classic)  # and an apply_nag pipeline on the same transformer
    applied.update_components(guider=modular_toy.cfg(4.0))
    apply_nag(applied, nag_scale=6.0)
    for pipe in (first, second, applied):  # a scheduler per request (it keeps a step index); the models shared
        with modular_toy.quiet():
            pipe.update_components(scheduler=type(classic.scheduler).from_config(classic.scheduler.config))
    jobs = {"first": (first, dict(negative_prompt="trees", nag_negative_prompt="x")),
            "second": (second, dict(nag_negative_prompt="blurry", nag_end=0.5)),
            "applied": (applied, dict(negative_prompt="trees", nag_negative_prompt="y"))}
    alone = {name: run(pipe, **kw) for name, (pipe, kw) in jobs.items()}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def work(name):
        try:
            pipe, kw = jobs[name]
            barrier.wait()
            results[name] = [run(pipe, **kw) for _ in range(2)]
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in jobs:
        assert all(torch.equal(out, alone[name]) for out in results[name]), name
