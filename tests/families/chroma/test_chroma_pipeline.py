"""apply_nag on the stock ChromaPipeline: NAG arguments, the text masks of both branches, CFG (two calls) guiding only
the conditional call, pre-encoded negatives, removal. Expected outputs: the same pipeline, unpatched, its transformer's
forward replaced by the test's own exact-layout computation (``chroma_toy.chroma_forward``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaPipeline

import chroma_toy
from flux_toy import SEQ_LEN
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=SEQ_LEN, output_type="latent")


def negative(pipe, text):
    embeds, _, mask, *_ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=SEQ_LEN)
    return embeds, mask


def reference_forward(model, nag_negative, uncond, calls):
    def forward(hidden_states, timestep, encoder_hidden_states, img_ids, txt_ids, attention_mask=None,
                return_dict=True, **_):
        text, mask = encoder_hidden_states, attention_mask
        if uncond is None or not torch.allclose(text, uncond, rtol=0, atol=1e-12):  # the conditional call
            n_text, n_mask = nag_negative
            text = torch.cat([text, n_text])
            mask = torch.cat([mask, torch.cat([n_mask, torch.ones_like(mask[:, n_mask.shape[1]:])], 1)])
        calls.append(text.shape[0])
        return (chroma_toy.chroma_forward(model, hidden_states, text, timestep, img_ids, txt_ids, mask),)

    return forward


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_chroma_pipeline_matches_the_exact_layout(cfg):
    pipe = chroma_toy.pipeline(ChromaPipeline)
    kw = {**COMMON, "guidance_scale": cfg, "negative_prompt": "trees"}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe("a red cat", generator=gen(), **kw).images
    uncond = negative(pipe, "trees")[0] if cfg > 1 else None
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, negative(pipe, "blurry dog"), uncond, calls)
    expected = pipe("a red cat", generator=gen(), **kw).images
    del pipe.transformer.forward
    assert calls == ([2, 1, 2, 1] if cfg > 1 else [2, 2])
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    embeds, mask = negative(pipe, "blurry dog")
    out2 = pipe("a red cat", nag_negative_prompt_embeds=embeds, nag_negative_prompt_attention_mask=mask,
                generator=gen(), **kw).images
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)
    remove_nag(pipe)
    assert torch.equal(pipe("a red cat", generator=gen(), **kw).images, plain)


def test_chroma_img2img_matches_the_exact_layout():
    import numpy as np
    import PIL.Image
    from diffusers import ChromaImg2ImgPipeline

    pipe = chroma_toy.pipeline(ChromaImg2ImgPipeline)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = {**COMMON, "guidance_scale": 1.0, "image": image, "strength": 0.9}
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, negative(pipe, "blurry dog"), None, calls)
    expected = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    del pipe.transformer.forward
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="blurry dog", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
