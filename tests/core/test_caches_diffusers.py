"""diffusers' own pipeline cache tests, on a NAG-patched FluxPipeline called without NAG and with NAG.

diffusers' test mixins (tests/pipelines/test_pipelines_common.py: PyramidAttentionBroadcastTesterMixin,
FasterCacheTesterMixin, FirstBlockCacheTesterMixin, TaylorSeerCacheTesterMixin, MagCacheTesterMixin, as
tests/pipelines/flux/test_pipeline_flux.py configures them) do not ship with the wheel. These tests make the same
checks, written anew: the hooks a cache installs and their state at start, during the call and after it (the
pipeline resets it), the output shape and closeness of a cached run, and that disabling the cache restores the
output. Without NAG the reference is the stock pipeline's; with NAG it is NAG without a cache, and the states of the
guided layout (integrations/caches.py) are checked too. Toy sizes and step counts are smaller than diffusers'.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import flux_toy
from nag_kernels.integrations import apply_nag, caches

hooks = pytest.importorskip("diffusers.hooks")
faster_cache = pytest.importorskip("diffusers.hooks.faster_cache")
pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 2  # double blocks; and as many single blocks
NAG = [False, True]


def make_pipe(patched: bool = True):
    pipe = flux_toy.pipeline(FluxPipeline)
    return apply_nag(pipe, backend="torch") if patched else pipe


def inputs(nag: bool, steps: int, **extra):
    args = dict(prompt="a squirrel eating a burger", height=32, width=32, num_inference_steps=steps,
                max_sequence_length=flux_toy.SEQ_LEN, output_type="np", generator=torch.Generator().manual_seed(0))
    if nag:
        args["nag_negative_prompt"] = "blurry"
    return {**args, **extra}


def image(pipe, nag: bool, steps: int, **extra) -> np.ndarray:
    with torch.no_grad():
        return pipe(**inputs(nag, steps, **extra)).images


def hooked(model, name):
    return [(n, m._diffusers_hook.get_hook(name)) for n, m in model.named_modules()
            if "_diffusers_hook" in m.__dict__ and m._diffusers_hook.get_hook(name) is not None]


def check_inference(nag: bool, config, steps: int, atol: float, timestep_callback: bool = False):
    """diffusers' ``_test_cache_inference``: a cached run is close to an uncached one, and disabling the cache gives
    the uncached output again (here exactly)."""
    pipe = make_pipe()
    reference = image(pipe, nag, steps)
    if timestep_callback:
        config.current_timestep_callback = lambda: pipe.current_timestep
    pipe.transformer.enable_cache(config)
    cached = image(pipe, nag, steps)
    pipe.transformer.disable_cache()
    restored = image(pipe, nag, steps)
    assert cached.shape == reference.shape and np.isfinite(cached).all()
    np.testing.assert_allclose(cached, reference, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(restored, reference)
    return pipe


def guided_states(hook) -> list:
    return [state for layout, state in caches.layout_states(hook).items() if layout is not None]


@pytest.mark.parametrize("nag", NAG)
def test_pyramid_attention_broadcast_layers(nag):
    pipe = make_pipe()
    config = hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        spatial_attention_block_identifiers=["transformer_blocks"], current_timestep_callback=lambda: pipe.current_timestep,
    )
    pipe.transformer.enable_cache(config)
    found = hooked(pipe.transformer, "pyramid_attention_broadcast")
    assert len(found) == 2 * LAYERS  # every attention of the double and the single blocks
    assert all(isinstance(hook, hooks.pyramid_attention_broadcast.PyramidAttentionBroadcastHook) for _, hook in found)
    assert all(hook.state.cache is None for _, hook in found)

    def during(p, i, t, values):
        for _, hook in found:  # hook.state: the layout of the last forward (guided in a NAG call)
            assert hook.state.cache is not None and hook.state.iteration == i + 1
            assert len(guided_states(hook)) == int(nag)
        return {}

    image(pipe, nag, 2, callback_on_step_end=during)
    for _, hook in found:  # reset by the pipeline, in every layout
        assert hook.state.cache is None and hook.state.iteration == 0
        assert list(caches.layout_states(hook)) in ([None], [None, "nag-exact"])
        assert all(s.cache is None and s.iteration == 0 for s in caches.layout_states(hook).values())


@pytest.mark.parametrize("nag", NAG)
def test_pyramid_attention_broadcast_inference(nag):
    config = hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        spatial_attention_block_identifiers=["transformer_blocks"],
    )
    check_inference(nag, config, steps=4, atol=0.2, timestep_callback=True)


def faster_cache_config():
    return hooks.FasterCacheConfig(  # as diffusers' FLUX.1 tests: FLUX.1 is guidance-distilled
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
    )


def test_faster_cache_basic_warning_or_errors_raised(caplog):
    pipe = make_pipe()
    with caplog.at_level(logging.WARNING, logger="diffusers.hooks.faster_cache"):
        hooks.apply_faster_cache(pipe.transformer, hooks.FasterCacheConfig(spatial_attention_block_skip_range=2))
    assert "No `attention_weight_callback` provided when enabling FasterCache" in caplog.text
    with pytest.raises(ValueError):
        hooks.apply_faster_cache(make_pipe().transformer,
                                 hooks.FasterCacheConfig(spatial_attention_block_skip_range=2, tensor_format="BFHWC"))


@pytest.mark.parametrize("nag", NAG)
def test_faster_cache_inference(nag):
    check_inference(nag, faster_cache_config(), steps=4, atol=0.1, timestep_callback=True)


@pytest.mark.parametrize("nag", NAG)
def test_faster_cache_state(nag):
    pipe = make_pipe()
    config = faster_cache_config()
    config.current_timestep_callback = lambda: pipe.current_timestep
    pipe.transformer.enable_cache(config)
    denoiser = pipe.transformer._diffusers_hook.get_hook(faster_cache._FASTER_CACHE_DENOISER_HOOK)
    assert isinstance(denoiser, faster_cache.FasterCacheDenoiserHook)
    blocks = [(n, m) for n, m in pipe.transformer.named_modules() if n and "_diffusers_hook" in m.__dict__]
    assert len(blocks) == 2 * LAYERS  # NAG adds no hook registry of its own
    found = [m._diffusers_hook.get_hook(faster_cache._FASTER_CACHE_BLOCK_HOOK) for _, m in blocks]
    assert all(isinstance(hook, faster_cache.FasterCacheBlockHook) for hook in found)

    def during(p, i, t, values):
        assert denoiser.state.iteration == i + 1
        for hook in found:
            assert hook.state.cache is not None and len(hook.state.cache) == 2 and hook.state.iteration == i + 1
            assert len(guided_states(hook)) == int(nag)
        return {}

    image(pipe, nag, 4, callback_on_step_end=during)
    assert all(s.iteration == 0 and s.low_frequency_delta is None and s.high_frequency_delta is None
               for s in caches.layout_states(denoiser).values())
    for hook in found:
        assert all(s.iteration == 0 and s.batch_size is None and s.cache is None
                   for s in caches.layout_states(hook).values())


@pytest.mark.parametrize("nag", NAG)
def test_first_block_cache_inference(nag):
    check_inference(nag, hooks.FirstBlockCacheConfig(threshold=0.8), steps=4, atol=0.1)


@pytest.mark.parametrize("nag", NAG)
def test_taylorseer_cache_inference(nag):
    config = hooks.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=4, max_order=1,
                                         taylor_factors_dtype=torch.bfloat16, use_lite_mode=True)
    check_inference(nag, config, steps=12, atol=0.1)


@pytest.mark.parametrize("nag", NAG)
def test_mag_cache_inference(nag):
    config = hooks.MagCacheConfig(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=12,
                                  mag_ratios=torch.ones(12))
    check_inference(nag, config, steps=12, atol=0.1)


def _config(name, pipe):
    if name == "PyramidAttentionBroadcast":
        return hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     current_timestep_callback=lambda: pipe.current_timestep)
    if name == "FasterCache":
        config = faster_cache_config()
        config.current_timestep_callback = lambda: pipe.current_timestep
        return config
    return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)


@pytest.mark.parametrize("name", ["PyramidAttentionBroadcast", "FasterCache", "TaylorSeerCache"])
def test_enable_cache_on_a_patched_pipeline_accepts_every_cache(name):
    """The regression behind these tests: enable_cache refused these three on any patched pipeline."""
    pipe, stock = make_pipe(), make_pipe(patched=False)
    pipe.transformer.enable_cache(_config(name, pipe))
    stock.transformer.enable_cache(_config(name, stock))
    assert pipe.transformer.is_cache_enabled
    np.testing.assert_array_equal(image(pipe, False, 4), image(stock, False, 4))
