"""Kandinsky 6 on the meta device: the patched model runs without values or kernels and its cost is counted under
FlopCounterMode by the flops suite's code (``meta_models/kandinsky6.py``); the full-size count (target: NAG at
most 1.02x a plain step on Kandinsky 6.0 Pro (distill) at 864x480, 121 frames, with audio and 1024 text tokens) runs
in CI's slow stage.

The counted difference is checked against the formula of what a guided step adds (docs/families/kandinsky6.md): per
modality, the text embedding and every text block for the NAG-negative rows (the modulation of their extra ``temb``
row, the projections, the attention over the text, the FFN), and in every fused block the K/V projections of those
rows and the video (audio) queries' attention over them. Nothing else runs at the text batch.
"""

from __future__ import annotations

import diffusers
import pytest

from meta_models import kandinsky6 as model_kandinsky6

if not hasattr(diffusers, "Kandinsky6Transformer3DModel"):
    pytest.skip("this diffusers has no Kandinsky 6 (diffusers >= 0.42)", allow_module_level=True)

NAME = "kandinsky6-pro-distill"
TINY = dict(in_visual_dim=4, out_visual_dim=8, in_text_dim=24, in_text_dim2=8, time_dim=16, model_dim=24, ff_dim=40,
            num_text_blocks=2, num_visual_blocks=3, axes_dims=(4, 4, 4), in_audio_dim=4, out_audio_dim=8,
            model_dim_a=36, time_dim_a=12, ff_dim_a=20, axes_dims_a=(4, 4, 4))
TINY_SIZE = (64, 32, 9)  # width, height, frames: 3 x 2 x 4 = 24 video tokens, 17 audio tokens


def added(config, resolution, text_tokens, audio=True) -> float:
    """TFLOP a guided step adds to a plain one (module docstring), for one video. The audio text blocks run whether or
    not the audio stream is denoised; the audio cross-attention only when it is."""
    t = text_tokens
    total = 0.0
    streams = [(config.model_dim, config.ff_dim, config.time_dim, model_kandinsky6.video_tokens(config, resolution)),
               (config.model_dim_a, config.ff_dim_a, config.time_dim_a,
                model_kandinsky6.audio_tokens(resolution) if audio else None)]
    for d, ff, td, n in streams:
        total += 2 * t * config.in_text_dim * d  # the text embedding
        block = 2 * td * 6 * d + 4 * (2 * t * d * d) + 2 * (2 * t * t * d) + 2 * (2 * t * d * ff)
        total += config.num_text_blocks * block
        if n is not None:
            total += config.num_visual_blocks * (2 * (2 * t * d * d) + 2 * (2 * n * t * d))
    return total / 1e12


@pytest.mark.parametrize("audio", [True, False], ids=["video-audio", "video-only"])
def test_tiny_config_on_meta_counts_plain_cfg_and_nag(audio):
    model = model_kandinsky6.build(NAME, **TINY)
    text = 8
    flops = {v: model_kandinsky6.count(NAME, v, TINY_SIZE, model, text_tokens=text, audio=audio)
             for v in model_kandinsky6.VARIANTS}
    assert flops["cfg"] == pytest.approx(2 * flops["no_nag"])
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model.config, TINY_SIZE, text, audio), rel=1e-9)
    assert model_kandinsky6.count(NAME, "no_nag", TINY_SIZE, model, text, audio) == flops["no_nag"]  # removed again


@pytest.mark.slow  # the full-size model on the meta device (~1 min of CPU): run by CI's slow stage
def test_kandinsky6_pro_480p_nag_is_at_most_1_02x_a_plain_step():
    model = model_kandinsky6.build(NAME)
    resolution = "864x480x121"
    flops = {v: model_kandinsky6.count(NAME, v, resolution, model) for v in ("no_nag", "nag")}
    assert model_kandinsky6.video_tokens(model.config, resolution) == 31 * 30 * 54
    assert model_kandinsky6.audio_tokens(resolution) == 218
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model.config, resolution, 1024), rel=1e-9)
    assert flops["no_nag"] == pytest.approx(4274.651, abs=1e-2)
    assert flops["nag"] == pytest.approx(4332.644, abs=1e-2)
    assert flops["nag"] / flops["no_nag"] <= 1.02
