"""apply_nag on the stock QwenImageEditPipeline and QwenImageEditPlusPipeline: the NAG negative is encoded with the
reference image(s) like the prompt, the reference-image tokens join the image stream, true CFG guides only the
conditional call. Expected outputs: the same pipeline, unpatched, its transformer's forward replaced by the test's
own computation (``qwenimage_toy.qwen_forward``) fed the NAG negative from ``encode_prompt``.

The edit pipelines need a Qwen2.5-VL text encoder that sees the image: a tiny one from a config (one vision block),
the byte-level toy tokenizer with the vision special tokens, and a ``Qwen2VLProcessor`` over the PIL image processor
(no video processor: it needs torchvision). The pipelines resize every reference image to about 1024 x 1024 pixels
(``calculate_dimensions(1024 * 1024, ratio)``, 384 x 384 for Plus' condition images); the tests patch that function
to keep the 32 x 32 images as they are.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

import qwenimage_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_qwenimage_pipeline import reference_forward, run_reference

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def processor():
    """The toy tokenizer with the vision tokens and a Qwen2-VL processor over the PIL image processor (one merged
    image token per 28 x 28 pixels, at most 56 x 56 pixels)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnly(Qwen2VLProcessor):  # the processor checks every part's class, the missing video one included
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    tok = qwenimage_toy.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]})
    return ImageOnly(image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56), tokenizer=tok)


def text_encoder(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids(VISION_TOKENS)
    torch.manual_seed(4)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=qwenimage_toy.TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=qwenimage_toy.TEXT_DIM),
        vocab_size=len(tok), bos_token_id=None, eos_token_id=None,
        **dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), ids)),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture
def small_images(monkeypatch):
    """The pipelines' target sizes become the 32 x 32 pixels of the test images."""
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "calculate_dimensions", lambda area, ratio: (32, 32))


def pipeline(cls):
    proc = processor()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=qwenimage_toy.vae(),
               text_encoder=text_encoder(proc.tokenizer), tokenizer=proc.tokenizer, processor=proc,
               transformer=qwenimage_toy.transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=torch.float64)


def image(seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


CASES = {
    "edit": (QwenImageEditPipeline, image(1)),
    "edit-plus-two-images": (QwenImageEditPlusPipeline, [image(1), image(2)]),
}


@pytest.mark.usefixtures("small_images")
@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_edit_pipelines_match_the_independent_computation(case, cfg):
    cls, images = CASES[case]
    pipe = pipeline(cls)
    # what the pipelines hand encode_prompt: the reference image(s) at their condition size (here as they are)
    shown = images if isinstance(images, PIL.Image.Image) else list(images)
    negative = pipe.encode_prompt("blurry, ugly", image=shown)
    other = pipe.encode_prompt("blurry, ugly", image=image(3) if cls is QwenImageEditPipeline else [image(3)] * 2)
    assert (other[0] - negative[0]).abs().max() > 1e-6  # the encoding sees the image: NAG must pass it on
    uncond = pipe.encode_prompt("trees", image=shown)[0] if cfg > 1 else None
    kw = {**COMMON, "prompt": "a red cat", "image": images, "true_cfg_scale": cfg, **({"negative_prompt": "trees"} if cfg > 1 else {})}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe(generator=gen(), **kw).images
    calls = []
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative, uncond, calls), generator=gen(),
                             **kw)
    assert calls == ([2, 1, 2, 1] if cfg > 1 else [2, 2])
    apply_nag(pipe, backend="torch")
    out = pipe(nag_negative_prompt="blurry, ugly", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    remove_nag(pipe)
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)
