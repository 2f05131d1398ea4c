"""The other Wan pipelines with NAG against the authors' computation: image-to-video (Wan 2.1 with the CLIP image
context, Wan 2.2 without, TI2V's per-token timesteps), video-to-video, and TI2V text-to-video (``expand_timesteps``).

Expected outputs: the stock pipeline on the same components with ``test_wan_pipeline.reference`` transformers.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanVideoToVideoPipeline
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

import wan_toy
from nag_kernels.integrations import apply_nag
from test_wan_pipeline import COMMON, reference

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """These pipelines clean prompts with ftfy, which this environment lacks: an identity stand-in."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v, pipeline_wan_vace, pipeline_wan_video2video

    for module in (pipeline_wan_i2v, pipeline_wan_video2video, pipeline_wan_vace):
        if not hasattr(module, "ftfy"):
            monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (wan_toy.SIZE, wan_toy.SIZE, 3), dtype=np.uint8))


def _i2v_21():
    torch.manual_seed(4)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=20, intermediate_size=37, num_attention_heads=4,
                                              num_hidden_layers=2, image_size=32, patch_size=8)).eval()
    parts = wan_toy.components()
    parts.pop("transformer")
    return WanImageToVideoPipeline(
        **parts, transformer=wan_toy.transformer(in_channels=36, image_dim=20, added_kv_proj_dim=24),
        image_encoder=vision, image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
    ), {"image": _image(1), "max_sequence_length": 512}  # Wan 2.1 I2V: the last 512 context tokens are the text


def _i2v_22():
    parts = wan_toy.components()
    parts.pop("transformer")
    return WanImageToVideoPipeline(**parts, transformer=wan_toy.transformer(in_channels=36)), {"image": _image(1)}


def _ti2v_i2v():
    parts = wan_toy.components()
    return WanImageToVideoPipeline(**parts, expand_timesteps=True), {"image": _image(1)}


def _ti2v_t2v():
    return WanPipeline(**wan_toy.components(), expand_timesteps=True), {}


def _v2v():
    frames = [_image(i) for i in range(wan_toy.FRAMES)]
    return WanVideoToVideoPipeline(**wan_toy.components()), {"video": frames, "strength": 0.9}


def _vace():
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    torch.manual_seed(5)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=wan_toy.TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
        vace_layers=[0], vace_in_channels=96,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    parts = wan_toy.components()
    parts["transformer"] = model.eval()
    return WanVACEPipeline(**parts), {}


CASES = {"i2v-2.1": _i2v_21, "i2v-2.2": _i2v_22, "ti2v-i2v": _ti2v_i2v, "ti2v-t2v": _ti2v_t2v, "v2v": _v2v,
         "vace": _vace}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_the_authors(case):
    pipe, extra = CASES[case]()
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dtype=torch.float64)
    kw = {**COMMON, **extra, "guidance_scale": 1.0, "prompt": "a red cat"}
    if isinstance(pipe, WanVideoToVideoPipeline):
        kw.pop("num_frames")
    length = kw["max_sequence_length"]
    with torch.no_grad():
        positive, negative = (pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=length)[0]
                              for p in ("a red cat", "blurry dog"))
    ref = reference(pipe, positive, negative)
    expected = ref(generator=torch.Generator().manual_seed(0), **kw).frames
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry dog", generator=torch.Generator().manual_seed(0), **kw).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-4
