"""Every diffusers cache x nag_end {1.0, 0.5} x {FLUX.1 exact, FLUX.1 fast, Wan, SDXL (batched CFG)} on tiny
pipelines (integrations/caches.py, docs/caches.md):

- a configuration that never skips gives exactly NAG's result without the cache;
- a configuration that skips runs through the nag_end switch (guided forwards, then plain ones), computes the first
  step with NAG (its latents equal NAG's without the cache) and skips where the cache can skip on that model;
- a patched pipeline called without NAG arguments gives exactly the stock pipeline's result with the same cache.

SDXL's UNet has no ``enable_cache`` (nor the reset diffusers' pipelines call at the end): its caches are installed
with ``diffusers.hooks.apply_*`` and reset here before each call; the SDXL pipeline enters no cache context, so one
is set around the call for the caches that need one.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

import flux_toy
import sdxl_toy
import wan_toy
from nag_kernels.integrations import apply_nag, call_state, caches

hooks = pytest.importorskip("diffusers.hooks")
pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4
_CONFIG_NAMES = {
    "PyramidAttentionBroadcast": "PyramidAttentionBroadcastConfig",
    "FasterCache": "FasterCacheConfig",
    "TaylorSeerCache": "TaylorSeerCacheConfig",
    "FirstBlockCache": "FirstBlockCacheConfig",
    "MagCache": "MagCacheConfig",
    "SeaCache": "SeaCacheConfig",
    "TextKVCache": "TextKVCacheConfig",
}
CACHES = [name for name, config in _CONFIG_NAMES.items() if hasattr(hooks, config)]
_APPLY = {
    "PyramidAttentionBroadcast": "apply_pyramid_attention_broadcast",
    "FasterCache": "apply_faster_cache",
    "TaylorSeerCache": "apply_taylorseer_cache",
    "FirstBlockCache": "apply_first_block_cache",
    "MagCache": "apply_mag_cache",
    "SeaCache": "apply_sea_cache",
    "TextKVCache": "apply_text_kv_cache",
}
# Where a skipping configuration must change the output (elsewhere the cache hooks nothing NAG's toy models run, or
# runs fail-open: SeaCache without a raw-vision adapter on FLUX.1, FasterCache's attention identifiers on a UNet).
SKIPS = {
    "flux": {"PyramidAttentionBroadcast", "FasterCache", "TaylorSeerCache", "FirstBlockCache", "MagCache"},
    "wan": {"PyramidAttentionBroadcast", "FasterCache", "TaylorSeerCache", "FirstBlockCache", "MagCache", "SeaCache"},
    "sdxl": {"PyramidAttentionBroadcast", "TaylorSeerCache"},
}
# diffusers refuses these on UNet2DConditionModel itself (no transformer-block list to hook).
NOT_ON_UNET = {"FirstBlockCache", "SeaCache"}
TAYLOR_IDS = {"flux": None, "wan": [r"blocks\.\d+\.attn[12]"], "sdxl": [r".*attn[12]"]}


def timestep_callback(pipe):
    def current():
        t = getattr(pipe, "current_timestep", None)
        return 500 if t is None else t  # the SDXL pipeline does not publish its timestep

    return current


def cache_config(name: str, kind: str, skip: bool, pipe, steps: int = STEPS, **override):
    """A configuration of cache ``name`` for a ``kind`` ("flux", "wan", "sdxl") toy that never skips
    (``skip=False``) or skips as much as it can (``skip=True``)."""
    if name == "PyramidAttentionBroadcast":
        every = 2 if skip else 1
        values = dict(
            spatial_attention_block_skip_range=every, cross_attention_block_skip_range=every,
            spatial_attention_timestep_skip_range=(-1, 1001), cross_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep_callback(pipe),
        )
        return hooks.PyramidAttentionBroadcastConfig(**{**values, **override})
    if name == "FasterCache":
        values = dict(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901) if skip else (-1, -1),
            attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
            current_timestep_callback=timestep_callback(pipe),
        )
        return hooks.FasterCacheConfig(**{**values, **override})
    if name == "TaylorSeerCache":
        values = dict(cache_interval=2, disable_cache_before_step=1 if skip else 10**6,
                      taylor_factors_dtype=torch.float64, cache_identifiers=TAYLOR_IDS[kind])
        return hooks.TaylorSeerCacheConfig(**{**values, **override})
    if name == "FirstBlockCache":
        return hooks.FirstBlockCacheConfig(threshold=1e9 if skip else 0.0)
    if name == "MagCache":
        return hooks.MagCacheConfig(
            threshold=10.0 if skip else 0.0, max_skip_steps=steps if skip else 0, retention_ratio=0.0,
            num_inference_steps=steps, mag_ratios=[1.0] * steps,
        )
    if name == "SeaCache":
        return hooks.SeaCacheConfig(threshold=1e9 if skip else 0.0)
    if name == "TextKVCache":
        return hooks.TextKVCacheConfig()
    raise KeyError(name)


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def enable(pipe, config, name: str) -> None:
    model = denoiser(pipe)
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
    else:
        getattr(hooks, _APPLY[name])(model, config)


def disable(pipe) -> None:
    model = denoiser(pipe)
    if hasattr(model, "disable_cache"):
        if model.is_cache_enabled:
            model.disable_cache()
        return
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name in list(getattr(registry, "_hook_order", ())):
            registry.remove_hook(hook_name, recurse=False)


def build(kind: str):
    if kind == "flux":
        return flux_toy.pipeline(FluxPipeline)
    if kind == "wan":
        return wan_toy.pipeline()
    return sdxl_toy.pipeline()


def run(pipe, nag: dict | None = None, steps: int = STEPS, first: list | None = None, reset_after: int | None = None,
        **kw):
    """One call with fixed seed; ``nag``: NAG arguments besides the negative (None: a call without NAG);
    ``first``: receives the latents after the first step; ``reset_after``: reset the cache state after that step,
    as diffusers does for a new inference."""
    extra = {} if nag is None else {"nag_negative_prompt": "a dog", **nag}
    if first is not None or reset_after is not None:
        def step_end(p, i, t, values):
            if i == 0 and first is not None:
                first.append(values["latents"].clone())
            if i == reset_after:
                reset_caches(p)
            return {}

        extra["callback_on_step_end"] = step_end
    extra.update(kw)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(pipe, FluxPipeline):
            return pipe("a cat", height=32, width=32, num_inference_steps=steps, max_sequence_length=flux_toy.SEQ_LEN,
                        output_type="latent", generator=generator, **extra).images
        if hasattr(pipe, "transformer"):
            extra.setdefault("guidance_scale", 1.0)  # one forward per step; true CFG: test_skipping_with_true_cfg
            return pipe("a cat", height=32, width=32, num_frames=5, num_inference_steps=steps,
                        max_sequence_length=wan_toy.SEQ_LEN, output_type="latent", generator=generator,
                        **extra).frames
        return _run_unet(pipe, generator, steps, extra)


def reset_caches(pipe) -> None:
    """``reset_stateful_hooks`` as a pipeline does after a call; on the SDXL toy, the cache context again."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    model = denoiser(pipe)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.invalidate_child_registries_cache()  # apply_* does not (enable_cache does)
    registry.reset_stateful_hooks()
    if hasattr(pipe, "unet"):
        _set_cache_context(model, CacheContext("cond"))


def _run_unet(pipe, generator, steps, extra):
    from diffusers.hooks.hooks import _set_cache_context

    unet = pipe.unet
    reset_caches(pipe)  # what FluxPipeline and WanPipeline do after each call
    try:
        return pipe("a cat", height=16, width=16, num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent", generator=generator, **extra).images
    finally:
        _set_cache_context(unet, None)


VARIANTS = {"flux-exact": ("flux", "exact"), "flux-fast": ("flux", "fast"), "wan": ("wan", "exact"),
            "sdxl": ("sdxl", "exact")}


@pytest.fixture(scope="module")
def patched():
    built = {}

    def get(variant: str):
        if variant not in built:
            kind, mode = VARIANTS[variant]
            built[variant] = apply_nag(build(kind), backend="torch", mode=mode)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def references(patched):
    """NAG without a cache: (output, latents after the first step), per variant and nag_end."""
    done = {}

    def get(variant: str, nag_end: float):
        if (variant, nag_end) not in done:
            first = []
            out = run(patched(variant), dict(nag_end=nag_end), first=first)
            done[variant, nag_end] = out, first[0]
        return done[variant, nag_end]

    return get


def _layouts(model, seen: list):
    """Record the cache layout of every forward of ``model`` (the slot caches.py's pre-hook sets)."""
    return model.register_forward_pre_hook(lambda m, a, k: seen.append(call_state.peek(caches.LAYOUT)),
                                           with_kwargs=True)


@pytest.mark.parametrize("nag_end", [1.0, 0.5])
@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_with_nag(patched, references, variant, name, nag_end):
    kind, mode = VARIANTS[variant]
    if kind == "sdxl" and name in NOT_ON_UNET:
        pytest.skip(f"diffusers cannot apply {name} to UNet2DConditionModel (test_calls_without_nag_are_the_stock_pipeline checks it)")
    pipe = patched(variant)
    expected, expected_first = references(variant, nag_end)

    enable(pipe, cache_config(name, kind, skip=False, pipe=pipe), name)
    try:
        never = run(pipe, dict(nag_end=nag_end))
    finally:
        disable(pipe)
    assert torch.equal(never, expected), (never - expected).abs().max()

    seen, first = [], []
    enable(pipe, cache_config(name, kind, skip=True, pipe=pipe), name)
    handle = _layouts(denoiser(pipe), seen)
    try:
        out = run(pipe, dict(nag_end=nag_end), first=first)
    finally:
        handle.remove()
        disable(pipe)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    torch.testing.assert_close(first[0], expected_first, rtol=0, atol=0)  # step 1 computed, guided
    guided = "nag-" + mode
    assert set(seen) <= {guided, None} and seen[0] == guided, seen
    if nag_end == 1.0:  # one guided forward per step
        assert seen.count(guided) == STEPS, seen
    else:  # guided steps, then plain ones once the noise level passes nag_end
        last = max(i for i, layout in enumerate(seen) if layout == guided)
        assert 0 < seen.count(guided) < STEPS and set(seen[last + 1:]) == {None}, seen
    if name in SKIPS[kind]:
        assert not torch.equal(out, expected), "the skipping configuration did not skip"
    if nag_end < 1:
        # Past the switch the plain layout's state starts as a new inference's would: resetting every cache state
        # there (what diffusers does between inferences) changes nothing. Sharing one state across layouts would
        # reuse guided outputs (2B text rows, NAG's combine in them) in the plain steps.
        reset = run_with(pipe, name, kind, nag_end, reset_after=seen.count(guided) - 1)
        assert torch.equal(out, reset), (out - reset).abs().max()


def run_with(pipe, name, kind, nag_end, **kw):
    enable(pipe, cache_config(name, kind, skip=True, pipe=pipe), name)
    try:
        if name == "FasterCache":
            step = kw.pop("reset_after")
            kw["callback_on_step_end"] = _faster_cache_reset(step)
        return run(pipe, dict(nag_end=nag_end), **kw)
    finally:
        disable(pipe)


def _faster_cache_reset(step):
    """The reset for FasterCache: its block hooks compute at iteration 0 only outside their timestep skip range, so
    a fresh state mid-inference starts at one full period (caches.py, ``_prime_faster_cache_block``)."""
    from diffusers.hooks.faster_cache import FasterCacheBlockHook

    def step_end(pipe, i, t, values):
        if i == step:
            reset_caches(pipe)
            for module in denoiser(pipe).modules():
                registry = module.__dict__.get("_diffusers_hook")
                hook = registry.get_hook("faster_cache_block") if registry is not None else None
                if isinstance(hook, FasterCacheBlockHook):
                    caches.layout_states(hook)[None].iteration = hook.block_skip_range
        return {}

    return step_end


TRUE_CFG = {"flux": dict(true_cfg_scale=2.0, negative_prompt="blurry", num_images_per_prompt=2),
            "wan": dict(guidance_scale=5.0, negative_prompt="blurry", num_videos_per_prompt=2)}


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("kind", list(TRUE_CFG))
def test_skipping_with_true_cfg_and_batch_2(patched, kind, name):
    """True CFG runs the unconditional pass as a separate plain call each step, next to the guided conditional one:
    two layouts interleaved from the first step, then only plain ones past nag_end; batch 2, where a reused tensor
    of the other layout no longer broadcasts."""
    pipe = patched(f"{kind}-exact" if kind == "flux" else kind)
    nag = dict(nag_end=0.5)
    first_ref = []
    expected = run(pipe, nag, first=first_ref, **TRUE_CFG[kind])
    seen, first = [], []
    enable(pipe, cache_config(name, kind, skip=True, pipe=pipe), name)
    handle = _layouts(denoiser(pipe), seen)
    try:
        out = run(pipe, nag, first=first, **TRUE_CFG[kind])
    finally:
        handle.remove()
        disable(pipe)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    torch.testing.assert_close(first[0], first_ref[0], rtol=0, atol=0)
    guided = seen.count("nag-exact")
    assert seen[:2] == ["nag-exact", None] and 0 < guided < STEPS and seen.count(None) == 2 * STEPS - guided, seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_references_are_guided(patched, references, variant):
    """The first-step check above means something: NAG's first step differs from the plain one."""
    first = []
    run(patched(variant), None, first=first)
    assert not torch.equal(first[0], references(variant, 1.0)[1])


@pytest.fixture(scope="module")
def stock():
    built = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = build(kind)
        return built[kind]

    return get


def _outcome(pipe, name, kind, config_kw):
    try:
        config = cache_config(name, kind, skip=True, pipe=pipe, **config_kw)
        enable(pipe, config, name)
    except Exception as error:  # noqa: BLE001  (diffusers refuses the cache on this model: same for both)
        disable(pipe)
        return ("enable", type(error), str(error))
    try:
        return run(pipe)
    except Exception as error:  # noqa: BLE001  (a cache that fails on this pipeline: the same way for both)
        return ("run", type(error), str(error))
    finally:
        disable(pipe)


@pytest.mark.parametrize("name", CACHES + ["FasterCache-cfg"])
@pytest.mark.parametrize("kind", ["flux", "wan", "sdxl"])
def test_calls_without_nag_are_the_stock_pipeline(stock, patched, kind, name):
    config_kw = {}
    if name == "FasterCache-cfg":  # the CFG-halves configuration NAG refuses at a NAG call: stock without NAG
        name, config_kw = "FasterCache", dict(is_guidance_distilled=False, unconditional_batch_skip_range=2,
                                              unconditional_batch_timestep_skip_range=(-1, 901), tensor_format="BCHW")
    reference = _outcome(stock(kind), name, kind, config_kw)
    out = _outcome(patched(f"{kind}-exact" if kind == "flux" else kind), name, kind, config_kw)
    if isinstance(reference, tuple):
        assert isinstance(out, tuple) and out[:2] == reference[:2], (out, reference)
    else:
        assert isinstance(out, torch.Tensor) and torch.equal(out, reference), out
