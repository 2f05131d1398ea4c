"""apply_nag on LTXPipeline, LTXImageToVideoPipeline and LTXConditionPipeline (per-token timesteps): NAG arguments with and without (batched) CFG against the authors' pattern, per-branch
text masks from the pipeline's own encoding, bad input.

Expected outputs come from a stock LTXPipeline on the same components whose transformer is the reference of
``test_ltx_transformer`` with the NAG negative's embeddings and mask appended to every call whose last text rows are
the positive ones.
"""

from __future__ import annotations

import pytest
import torch
import numpy as np
import PIL.Image
from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline

import ltx_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_ltx_transformer import authors_model

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=ltx_toy.SIZE, width=ltx_toy.SIZE, num_frames=ltx_toy.FRAMES, num_inference_steps=2,
              max_sequence_length=ltx_toy.SEQ_LEN, output_type="latent")


def encoded(pipe, prompt):
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                max_sequence_length=ltx_toy.SEQ_LEN)
    return embeds, mask


def reference(pipe, positive, negative):
    def append(module, args, kwargs):
        text, rows = kwargs["encoder_hidden_states"], positive[0].shape[0]
        if torch.allclose(text[-rows:], positive[0], rtol=0, atol=1e-12):
            kwargs = {**kwargs, "encoder_hidden_states": torch.cat([text, negative[0]]),
                      "encoder_attention_mask": torch.cat([kwargs["encoder_attention_mask"], negative[1]])}
        return args, kwargs

    parts = dict(pipe.components)
    parts["transformer"] = authors_model(parts["transformer"])
    parts["transformer"].register_forward_pre_hook(append, with_kwargs=True)
    ref = type(pipe)(**parts)
    ref.set_progress_bar_config(disable=True)
    return ref


def gen():
    return torch.Generator().manual_seed(0)


def _image():
    rng = np.random.default_rng(1)
    return PIL.Image.fromarray(rng.integers(0, 255, (ltx_toy.SIZE, ltx_toy.SIZE, 3), dtype=np.uint8))


EXTRA = {LTXPipeline: {}, LTXImageToVideoPipeline: {"image": _image()}, LTXConditionPipeline: {"image": _image()}}


@pytest.mark.parametrize("cls, guidance", [(LTXPipeline, 1.0), (LTXPipeline, 3.0), (LTXImageToVideoPipeline, 3.0),
                                           (LTXConditionPipeline, 3.0)],
                         ids=["t2v-nag-only", "t2v-cfg", "i2v-cfg", "condition-cfg"])
def test_ltx_pipeline_matches_the_authors_pattern(cls, guidance):
    pipe = ltx_toy.pipeline(cls)
    kw = {**COMMON, **EXTRA[cls], "guidance_scale": guidance, "negative_prompt": "ugly"}
    plain = pipe(prompt="a red cat", generator=gen(), **kw).frames
    positive, negative = encoded(pipe, "a red cat"), encoded(pipe, "dog")
    assert not torch.equal(positive[1], negative[1])  # the two branches have different masks
    expected = reference(pipe, positive, negative)(prompt="a red cat", generator=gen(), **kw).frames
    apply_nag(pipe, backend="torch")
    out = pipe(prompt="a red cat", nag_negative_prompt="dog", generator=gen(), **kw).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-3
    out = pipe(prompt="a red cat", nag_negative_prompt_embeds=negative[0], nag_negative_prompt_attention_mask=negative[1],
               generator=gen(), **kw).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="must be given together"):
        pipe(prompt="a red cat", nag_negative_prompt_embeds=negative[0], **kw)
    remove_nag(pipe)
    assert torch.equal(pipe(prompt="a red cat", generator=gen(), **kw).frames, plain)
