"""diffusers' caches with NAG on a tiny FluxPipeline: the ones that work give NAG's result when they never skip and
stay finite when they skip (through nag_end switching, batch 2 and true CFG); the others are refused clearly by
apply_nag and by enable_cache (integrations/caches.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

import flux_toy
from flux_toy import single_thread  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag

hooks = pytest.importorskip("diffusers.hooks")
pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3
COMMON = dict(height=32, width=32, num_inference_steps=STEPS, max_sequence_length=flux_toy.SEQ_LEN, output_type="latent")


def config(name: str, skip: bool, pipe=None):
    """A cache config that never skips (``skip=False``) or skips as much as it can (``skip=True``)."""
    if name == "FirstBlockCache":
        return hooks.FirstBlockCacheConfig(threshold=1e9 if skip else 0.0)
    if name == "MagCache":
        return hooks.MagCacheConfig(
            threshold=10.0 if skip else 0.0, max_skip_steps=STEPS if skip else 0, retention_ratio=0.0,
            num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS,
        )
    if name == "SeaCache":
        return hooks.SeaCacheConfig(threshold=1e9 if skip else 0.0)
    if name == "TextKVCache":
        return hooks.TextKVCacheConfig()
    if name == "TaylorSeerCache":
        return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)
    if name == "PyramidAttentionBroadcast":
        return hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep
        )
    if name == "FasterCache":
        return hooks.FasterCacheConfig(current_timestep_callback=lambda: pipe.current_timestep)
    raise KeyError(name)


def available(name: str) -> bool:
    return hasattr(hooks, {"PyramidAttentionBroadcast": "PyramidAttentionBroadcastConfig"}.get(name, name + "Config"))


WORKING = [n for n in ("FirstBlockCache", "MagCache", "SeaCache", "TextKVCache") if available(n)]
REFUSED = [n for n in ("TaylorSeerCache", "PyramidAttentionBroadcast", "FasterCache") if available(n)]


@pytest.fixture(scope="module")
def pipe():
    pipe = apply_nag(flux_toy.pipeline(FluxPipeline), backend="torch")
    yield pipe
    remove_nag(pipe)


def call(pipe, **extra):
    with torch.no_grad():
        return pipe("a cat", nag_negative_prompt="a dog", generator=torch.Generator().manual_seed(0), **COMMON,
                    **extra).images


@pytest.mark.parametrize("name", WORKING)
def test_working_cache_that_never_skips_gives_nags_result(pipe, name):
    expected = call(pipe)
    pipe.transformer.enable_cache(config(name, skip=False))
    try:
        out = call(pipe)
    finally:
        pipe.transformer.disable_cache()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in ("FirstBlockCache", "MagCache") if n in WORKING])
def test_skipping_cache_runs_through_nag_end_batches_and_true_cfg(pipe, name):
    scenarios = [
        dict(nag_end=0.5),  # the text batch goes from 2B to B mid-run
        dict(num_images_per_prompt=2),
        dict(true_cfg_scale=2.0, negative_prompt="blurry", nag_end=0.6),
    ]
    plain = [call(pipe, **extra) for extra in scenarios]
    pipe.transformer.enable_cache(config(name, skip=True))
    try:
        cached = [call(pipe, **extra) for extra in scenarios]
    finally:
        pipe.transformer.disable_cache()
    for extra, out, ref in zip(scenarios, cached, plain):
        assert out.shape == ref.shape and torch.isfinite(out).all(), extra
    assert any((out - ref).abs().max() > 1e-6 for out, ref in zip(cached, plain))  # it did skip work


@pytest.mark.parametrize("name", REFUSED)
def test_refused_cache_is_refused_by_enable_cache_and_apply_nag(pipe, name):
    transformer = pipe.transformer
    with pytest.raises(ValueError, match=f"NAG does not work with {name}"):
        transformer.enable_cache(config(name, skip=True, pipe=pipe))
    assert not transformer.is_cache_enabled
    assert call(pipe).isfinite().all()  # still usable
    remove_nag(pipe)  # enable_cache is diffusers' own again ...
    try:
        transformer.enable_cache(config(name, skip=True, pipe=pipe))
        with pytest.raises(ValueError, match=f"apply_nag: NAG does not work with {name}.*FirstBlockCache"):
            apply_nag(pipe, backend="torch")  # ... and apply_nag refuses the model that has the cache on
        assert not hasattr(transformer, "_nag_state")
    finally:
        transformer.disable_cache()
        apply_nag(pipe, backend="torch")


@pytest.mark.skipif(not available("TaylorSeerCache"), reason="this diffusers has no TaylorSeerCache")
def test_a_refused_cache_installed_through_its_apply_function_is_refused():
    model = flux_toy.transformer().double()
    hooks.apply_taylorseer_cache(model, hooks.TaylorSeerCacheConfig())
    with pytest.raises(ValueError, match="NAG does not work with TaylorSeerCache"):
        apply_nag(model)
