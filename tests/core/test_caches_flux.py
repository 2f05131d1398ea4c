"""diffusers' caches on a NAG-patched FLUX.1 (integrations/caches.py, docs/caches.md): one cache state per batch
layout, what a user sees of it, the hook order when a cache was enabled before ``apply_nag``, ``remove_nag``, the
one configuration refused at a NAG call, caches installed with ``diffusers.hooks.apply_*`` and the transformer called
directly. The matrix over caches, nag_end and families is tests/core/test_caches_matrix.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

import flux_toy
from nag_kernels.integrations import apply_nag, caches, remove_nag
from test_caches_matrix import STEPS, cache_config, run

hooks = pytest.importorskip("diffusers.hooks")
pytestmark = pytest.mark.usefixtures("single_thread")


def _hook(model, name):
    return [m._diffusers_hook.get_hook(name) for m in model.modules()
            if "_diffusers_hook" in m.__dict__ and m._diffusers_hook.get_hook(name) is not None]


@pytest.fixture(scope="module")
def pipe():
    return apply_nag(flux_toy.pipeline(FluxPipeline), backend="torch")


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("name", ["FirstBlockCache", "MagCache", "TaylorSeerCache-lite"])
def test_cache_enabled_before_apply_nag_is_the_cache_enabled_after(mode, name):
    """These caches hook the blocks whose forward NAG replaces (FLUX.1's single blocks): enabled first, they would
    sit inside NAG's forward (fast mode never calls it; exact mode hands it 2B image rows, and batch 2 no longer
    broadcasts); apply_nag puts them back outside, and disable_cache afterwards leaves NAG's forward in place."""
    extra = dict(use_lite_mode=True) if name.endswith("-lite") else {}
    name = name.removesuffix("-lite")
    nag = dict(nag_end=0.5, num_images_per_prompt=2)
    after = apply_nag(flux_toy.pipeline(FluxPipeline), backend="torch", mode=mode)
    expected_plain = run(after, nag)
    after.transformer.enable_cache(cache_config(name, "flux", skip=True, pipe=after, **extra))
    expected = run(after, nag)

    before = flux_toy.pipeline(FluxPipeline)
    before.transformer.enable_cache(cache_config(name, "flux", skip=True, pipe=before, **extra))
    apply_nag(before, backend="torch", mode=mode)
    torch.testing.assert_close(run(before, nag), expected, rtol=0, atol=0)
    before.transformer.disable_cache()
    torch.testing.assert_close(run(before, nag), expected_plain, rtol=0, atol=0)


def test_per_layout_states_during_a_call_and_reset_after_it(pipe):
    """PyramidAttentionBroadcast (hook.state) and FirstBlockCache (a StateManager): with nag_end=0.5 a guided state
    and the stock (plain) state live side by side during the call, each with its own batch; the pipeline's reset
    clears both."""
    seen = {}

    def inspect(p, i, t, values):
        if i == STEPS - 1:
            for hook in _hook(p.transformer, "pyramid_attention_broadcast")[:1]:
                seen["pab"] = {k: (s.iteration, [x.shape[0] for x in s.cache]) for k, s in
                               caches.layout_states(hook).items()}
            for hook in _hook(p.transformer, "fbc_leader_block_hook"):
                seen["fbc"] = set(caches.layout_states(hook))
        return {}

    for name in ("PyramidAttentionBroadcast", "FirstBlockCache"):
        pipe.transformer.enable_cache(cache_config(name, "flux", skip=True, pipe=pipe))
        try:
            run(pipe, dict(nag_end=0.5), callback_on_step_end=inspect, num_images_per_prompt=2)
            for hook in _hook(pipe.transformer, "pyramid_attention_broadcast") + _hook(
                pipe.transformer, "fbc_leader_block_hook"
            ):
                states = caches.layout_states(hook)
                assert set(states) <= {None} and all(getattr(s, "cache", None) is None for s in states.values())
        finally:
            pipe.transformer.disable_cache()
    # transformer_blocks.0.attn returns (image, text): image rows B = 2, text rows 2B guided and B plain
    guided = [k for k in seen["pab"] if k is not None]
    assert guided == ["nag-exact"] and seen["pab"]["nag-exact"][1] == [2, 4] and seen["pab"][None][1] == [2, 2]
    assert sum(it for it, _ in seen["pab"].values()) == STEPS  # every step counted once, in its own layout
    assert seen["fbc"] == {"cond", ("cond", "nag-exact")}  # diffusers' context name, and (name, layout)


def test_faster_cache_with_cfg_halves_is_refused_at_a_nag_call_only(pipe):
    """is_guidance_distilled=False reads a call's rows as [uncond; cond] halves: refused when a call is guided,
    accepted by enable_cache and by apply_nag, untouched on calls without NAG (test_caches_matrix compares those
    with stock diffusers)."""
    config = cache_config("FasterCache", "flux", skip=True, pipe=pipe, is_guidance_distilled=False)
    pipe.transformer.enable_cache(config)
    try:
        apply_nag(pipe, backend="torch")  # nothing refused when NAG is applied
        with pytest.raises(ValueError, match="FasterCache with is_guidance_distilled=False.*is_guidance_distilled=True"):
            run(pipe, dict(nag_end=1.0))
    finally:
        pipe.transformer.disable_cache()
    assert torch.isfinite(run(pipe, dict(nag_end=1.0))).all()


def test_remove_nag_gives_back_the_stock_hooks_and_results():
    stock = flux_toy.pipeline(FluxPipeline)
    patched = apply_nag(flux_toy.pipeline(FluxPipeline), backend="torch")
    for name in ("PyramidAttentionBroadcast", "FirstBlockCache"):
        stock.transformer.enable_cache(cache_config(name, "flux", skip=True, pipe=stock))
        patched.transformer.enable_cache(cache_config(name, "flux", skip=True, pipe=patched))
        run(patched, dict(nag_end=0.5))
        remove_nag(patched)
        try:
            assert "enable_cache" not in patched.transformer.__dict__
            for module in patched.transformer.modules():
                registry = module.__dict__.get("_diffusers_hook")
                for hook in registry.hooks.values() if registry is not None else ():
                    assert not isinstance(hook.__dict__.get("state"), caches._PerLayout)
                    manager = hook.__dict__.get("state_manager")
                    assert manager is None or "get_state" not in manager.__dict__
            assert torch.equal(run(patched), run(stock))
        finally:
            stock.transformer.disable_cache()
            patched.transformer.disable_cache()
            apply_nag(patched, backend="torch")


def test_cache_installed_with_apply_after_apply_nag(pipe):
    """diffusers.hooks.apply_* bypasses enable_cache: the hooks are found at the next NAG call."""
    expected = run(pipe, dict(nag_end=0.5))
    hooks.apply_pyramid_attention_broadcast(
        pipe.transformer, cache_config("PyramidAttentionBroadcast", "flux", skip=False, pipe=pipe)
    )
    try:
        assert torch.equal(run(pipe, dict(nag_end=0.5)), expected)
        assert all(isinstance(h.__dict__["state"], caches._PerLayout)
                   for h in _hook(pipe.transformer, "pyramid_attention_broadcast"))
    finally:
        pipe.transformer._diffusers_hook.remove_hook("pyramid_attention_broadcast", recurse=True)


def test_transformer_called_directly_in_both_layouts():
    """The model contract (2B text rows: guided; B: plain) inside diffusers' cache_context, without a pipeline:
    TaylorSeer keeps a state per layout under the same context name."""
    model = apply_nag(flux_toy.transformer().double(), backend="torch")
    model.enable_cache(hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                   taylor_factors_dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    latents = flux_toy.latents(1)
    text = torch.randn(2, flux_toy.SEQ_LEN, flux_toy.TEXT_DIM, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, flux_toy.TEXT_DIM, generator=g, dtype=torch.float64)
    img_ids = torch.zeros(latents.shape[1], 3, dtype=torch.float64)
    txt_ids = torch.zeros(flux_toy.SEQ_LEN, 3, dtype=torch.float64)

    def forward(rows, t):
        with model.cache_context("cond"):
            return model(hidden_states=latents, encoder_hidden_states=text[:rows], pooled_projections=pooled[:rows],
                         timestep=torch.tensor([t], dtype=torch.float64), img_ids=img_ids, txt_ids=txt_ids,
                         return_dict=False)[0]

    with torch.no_grad():
        outs = [forward(rows, t) for rows, t in ((2, 1.0), (1, 0.9), (2, 0.8), (1, 0.7), (2, 0.6), (1, 0.5))]
    assert all(o.shape == latents.shape and torch.isfinite(o).all() for o in outs)
    manager = _hook(model, "taylorseer_cache")[0].state_manager
    assert {key: state.current_step for key, state in manager._state_cache.items()} == {
        "cond": 2, ("cond", "nag-exact"): 2}
    model.disable_cache()
    remove_nag(model)
