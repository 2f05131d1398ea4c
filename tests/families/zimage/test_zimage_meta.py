"""The full-size Z-Image transformer on the meta device under FlopCounterMode at 1024^2: NAG's default path costs
exactly the NAG-negative caption's tokens (counted independently here), at most 1.15x a plain step at the pipelines'
longest caption (512 tokens, negative as long), and little more for short captions.

The counts are of a model with one block per stack, the block costs repeated to the full depth
(``meta_models.zimage.repeat``); ``test_one_block_per_stack_counts_the_full_depth`` checks that against a full-depth
count on a narrow config."""

from __future__ import annotations

import pytest

from meta_models import zimage
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

N = 4096  # image tokens at 1024^2 (8x VAE, 2x2 patches)
NAME = "z-image-turbo"


def tflops(name: str, variant: str, resolution: int, model, caption: int = zimage.TEXT_TOKENS,
           negative: int | None = None) -> float:
    """One step of ``variant`` (``nag`` with ``apply_nag``; ``nag_2b`` derived from the cfg and no_nag counts)."""
    (apply_nag if variant == "nag" else remove_nag)(model)

    def counted(v, negative=None):
        kw = zimage.step_inputs(model, v, resolution, caption, negative)
        return count(lambda: model(**kw), zimage.repeat(name, model))

    if variant == "nag_2b":
        return zimage.nag_2b(name, model, counted("cfg"), counted("no_nag")) / 1e12
    return counted(variant, negative).tflop


def expected_extra(config, prompt: int, negative: int) -> float:
    """The negative's ``Tn`` caption tokens through the caption embedder, every joined layer (12 d^2 multiply-adds
    per token: Q/K/V/out, SwiGLU of width 8d/3) and the final projection; the context refiner runs the 2B captions as
    one batch, padded to the longer (``max(Tp, Tn)`` tokens, ``max^2`` attention pairs); per joined layer the
    attention has 2 N Tn + Tn^2 more query-key pairs (4 d FLOPs each)."""
    d = config["dim"]
    layers, refiners = config["n_layers"], config["n_refiner_layers"]
    out = config["all_patch_size"][0] ** 2 * config["in_channels"]
    padded = max(prompt, negative)
    linear = 2 * negative * (config["cap_feat_dim"] * d + 12 * d * d * layers + d * out)
    linear += 2 * padded * 12 * d * d * refiners
    attention = 4 * d * (padded**2 * refiners + (2 * N * negative + negative**2) * layers)
    return (linear + attention) / 1e12


def test_default_path_flops_at_1024():
    model = zimage.build(NAME, shallow=True)
    config = zimage.CONFIGS[NAME]
    plain = tflops(NAME, "no_nag", 1024, model)
    nag = tflops(NAME, "nag", 1024, model)
    assert nag - plain == pytest.approx(expected_extra(config, 512, 512), rel=1e-9)
    assert nag / plain <= 1.15, f"NAG {nag:.1f} TFLOP is {nag / plain:.3f}x the plain {plain:.1f}"
    short = tflops(NAME, "nag", 1024, model, caption=128, negative=32)
    short_plain = tflops(NAME, "no_nag", 1024, model, caption=128)
    assert short - short_plain == pytest.approx(expected_extra(config, 128, 32), rel=1e-9)
    assert short / short_plain <= 1.02


def test_one_block_per_stack_counts_the_full_depth(monkeypatch):
    narrow = {**zimage.CONFIGS[NAME], "dim": 256, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
              "n_layers": 2, "n_refiner_layers": 2}
    monkeypatch.setitem(zimage.CONFIGS, "narrow", narrow)
    full, shallow = zimage.build("narrow"), zimage.build("narrow", shallow=True)
    for variant in ("nag", "nag_2b"):  # nag_2b counts the no_nag and cfg forwards
        assert tflops("narrow", variant, 128, shallow, 64, 40) == tflops("narrow", variant, 128, full, 64, 40)
