"""diffusers' caches on the newer families' transformers (the ones whose class has ``enable_cache``): a configuration
that never skips gives exactly NAG's guided result without the cache, step after step, and a plain forward with the
cache on is the stock model's with the same cache. Where diffusers itself cannot put a cache on the stock model,
the patched model must fail the same way (not differently)."""

from __future__ import annotations

import copy

import pytest
import torch

import hunyuanvideo15_toy
import kandinsky6_toy
import ltx2_toy
import qwenimage21_toy
from nag_kernels.integrations import apply_nag
from test_hunyuanvideo15_transformer import inputs as hunyuan_inputs
from test_hunyuanvideo15_transformer import run as hunyuan_run
from test_ltx2_transformer import inputs as ltx2_inputs
from test_ltx2_transformer import run as ltx2_run
from test_qwenimage21_transformer import run as qwen21_run

hooks = pytest.importorskip("diffusers.hooks")
pytestmark = pytest.mark.usefixtures("single_thread")


def _first_block():
    return hooks.FirstBlockCacheConfig(threshold=0.0)  # a residual change is never below 0: never skips


def _pyramid():
    return hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=1, current_timestep_callback=lambda: 500)


def _taylorseer():
    return hooks.TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0)


CONFIGS = {"FirstBlockCache": _first_block, "PyramidAttentionBroadcast": _pyramid, "TaylorSeerCache": _taylorseer}
FAMILIES = {
    "qwenimage21": (qwenimage21_toy.transformer, lambda: qwenimage21_toy.inputs(2), qwen21_run),
    "ltx2": (lambda: ltx2_toy.transformer("2.0"), lambda: ltx2_inputs("2.0"), ltx2_run),
    "hunyuanvideo15": (hunyuanvideo15_toy.transformer, hunyuan_inputs, hunyuan_run),
    "kandinsky6": (kandinsky6_toy.transformer, kandinsky6_toy.inputs, lambda model, kw: kandinsky6_toy.run(model, kw)),
}


def _hooked(model) -> int:
    """How many modules carry a diffusers hook (0: the cache found nothing to hook on this model, as on the stock
    one: then the equality below holds trivially, as it does for diffusers)."""
    return sum(1 for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks)


def _steps(model, kw, run, cached: bool):
    outs = []
    for _ in range(3):
        if cached:
            with model.cache_context("cond"):
                outs.append(run(model, kw))
        else:
            outs.append(run(model, kw))
    return outs


@pytest.mark.parametrize("cache", list(CONFIGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_never_skipping_cache_gives_nag_without_the_cache(family, cache):
    build, inputs, run = FAMILIES[family]
    stock = build().double().eval()
    model = apply_nag(copy.deepcopy(stock), backend="torch")
    kw = inputs()
    expected = _steps(model, kw, run, cached=False)
    try:
        stock.enable_cache(CONFIGS[cache]())
    except Exception as err:  # diffusers cannot cache this model: NAG's model refuses the same way
        with pytest.raises(type(err)):
            model.enable_cache(CONFIGS[cache]())
        return
    model.enable_cache(CONFIGS[cache]())
    assert _hooked(model) == _hooked(stock)  # NAG's model gets the cache where the stock model does
    try:
        got = _steps(model, kw, run, cached=True)
    finally:
        model.disable_cache()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
