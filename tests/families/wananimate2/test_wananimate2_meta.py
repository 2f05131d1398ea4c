"""Wan Animate 2 on the meta device: the patched model runs without values or kernels and its cost is counted under
FlopCounterMode by the flops code (``meta_models/wananimate2.py``); the full-size count (target: NAG at most
1.02x a plain denoising step on Wan2.2-Animate-2-14B at the blocks' default 800x640, 81 frames per segment, 512 text
tokens) runs in CI's slow stage.

torch 2.13 refuses flex attention on meta tensors, and the generation pass's self-attention runs on flex only: the
meta builder counts it as FlopCounterMode counts flex attention, densely (tested below), and the block-sparse figure
subtracts the blocks the mask excludes. The counted difference is checked against the formula of what a guided step
adds (docs/families/wananimate2.md): per block, the K/V projections of the NAG-negative text rows and the video
queries' attention over them; once, the text embedder on those rows. Nothing else runs at the text batch.
"""

from __future__ import annotations

import pytest
import torch

from meta_models import wananimate2 as meta
from nag_kernels.integrations import apply_nag

NAME = "wan-animate-2-14b"
TINY = dict(text_len=8, dim=24, ffn_dim=32, freq_dim=16, text_dim=32, num_heads=2, num_layers=2)
TINY_SIZE = (64, 32, 9)  # width, height, frames: 3 latent frames of 4 x 8 -> 4 x 2 x 4 = 32 tokens, 24 reference


def added(config, resolution, text_tokens) -> float:
    """TFLOP a guided step adds to a plain one (module docstring), for one video."""
    d, t, n = config.dim, text_tokens, meta.video_tokens(resolution)
    per_block = 2 * (2 * t * d * d) + 2 * (2 * n * t * d)
    return (config.num_layers * per_block + 2 * t * (config.text_dim * d + d * d)) / 1e12


def flex_dense(config, resolution) -> float:
    """TFLOP of one forward's flex self-attention as FlopCounterMode counts flex attention: dense over the packed
    buffers (queries padded to 128, keys generation + reference each padded to 128)."""
    q = -(-meta.video_tokens(resolution) // 128) * 128
    k = q + -(-meta.reference_tokens(resolution) // 128) * 128
    return config.num_layers * 4 * q * k * config.dim / 1e12


def test_the_stock_generation_pass_cannot_run_on_meta():
    from diffusers import WanAnimate2Transformer3DModel

    with torch.device("meta"):
        model = WanAnimate2Transformer3DModel(**TINY).eval()  # not meta.build: without its flex stand-in
    kw = meta.step_inputs(model, "no_nag", TINY_SIZE, text_tokens=8)[0]
    with pytest.raises(ValueError, match="FlexAttention is only supported on CUDA, CPU, HPU, or MPS devices"):
        with torch.no_grad(), meta.eager_block_masks():
            model(**kw)


def test_tiny_config_on_meta_counts_plain_cfg_and_nag():
    model = meta.build(NAME, **TINY)
    flops = {v: meta.count(NAME, v, TINY_SIZE, model, text_tokens=8) for v in meta.VARIANTS}
    assert flops["cfg"] == pytest.approx(2 * flops["no_nag"])  # two blocks: the unconditional pass skips none
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model.config, TINY_SIZE, 8), rel=1e-9)
    assert meta.count(NAME, "no_nag", TINY_SIZE, model, text_tokens=8) == flops["no_nag"]  # removed again


def test_the_flex_stand_in_counts_what_flop_counter_counts_for_flex(monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = meta.build(NAME, **TINY)
    kw = meta.step_inputs(model, "no_nag", TINY_SIZE)[0]
    with_flex = meta.count(NAME, "no_nag", TINY_SIZE, model)
    monkeypatch.setattr(meta, "_dense_flex", lambda stock: lambda query, key, value, **_: torch.empty_like(query))
    without = meta.count(NAME, "no_nag", TINY_SIZE, model)
    assert with_flex - without == pytest.approx(flex_dense(model.config, TINY_SIZE), rel=1e-9)
    assert kw["kv_cache"].get(0).key.shape == (1, meta.reference_tokens(TINY_SIZE), 2, 12)
    # the stand-in lives only for the duration of the meta model's forwards
    assert _AttentionBackendRegistry._backends[AttentionBackendName.FLEX].__name__ == "_native_flex_attention"


def test_flops_suite_inputs():
    model = meta.build(NAME, **TINY)
    steps = meta.flops_inputs(TINY_SIZE, model, 2)
    assert [len(steps[v]) for v in ("no_nag", "cfg", "nag")] == [1, 2, 1]
    assert steps["cfg"][1]["is_uncondtion"] and not steps["cfg"][0].get("is_uncondtion")
    nag = steps["nag"][0]
    assert len(nag["hidden_states"]) == 2 and len(nag["encoder_hidden_states"]) == 4
    assert nag["encoder_hidden_states_image"].shape == (2, 257, 1280)
    apply_nag(model)
    with torch.no_grad():
        out = model(**nag)[0]
    assert len(out) == 2 and out[0].device.type == "meta"


def test_flex_blocks_of_the_default_resolution():
    active, total = meta.flex_blocks("800x640x81")
    assert total == 344 * (344 + 329)  # 44000 queries -> 344 blocks; 42000 reference keys -> 329 blocks
    assert active == 124051  # every generation block, and ~16 reference blocks per query block


@pytest.mark.slow  # the full-size model on the meta device (~10 s of CPU): run by CI's slow stage
def test_wan_animate_2_14b_800x640_nag_is_at_most_1_02x_a_plain_step():
    model = meta.build(NAME)
    resolution = "800x640x81"
    flops = {v: meta.count(NAME, v, resolution, model) for v in meta.VARIANTS}
    assert meta.video_tokens(resolution) == 22 * 50 * 40 and meta.reference_tokens(resolution) == 21 * 50 * 40
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model.config, resolution, 512), rel=1e-9)
    assert flops["no_nag"] == pytest.approx(4190.323, abs=1e-2)
    assert flops["nag"] == pytest.approx(4210.974, abs=1e-2)
    assert flops["cfg"] == pytest.approx(8275.892, abs=1e-2)  # the unconditional pass skips block 9
    assert flops["nag"] / flops["no_nag"] <= 1.02  # 1.0049x, flex attention counted densely
    skipped = meta.flex_block_sparse_tflop(model.config, resolution)
    assert (flops["nag"] - skipped) / (flops["no_nag"] - skipped) <= 1.02  # 1.0075x, block-sparse
