"""apply_nag on MiniMax-H3's modular blocks (``MiniMaxH3Blocks``, t2va; guidance-distilled: no guider, one call per
step), through the family's modular declaration (``Family.modular``). The core's NAG text-encoder step hands a one-prompt call's negative to the
text-encoder block as a string, as MiniMax-H3's step requires.

Against the float64 reference: the stock blocks run with the transformer's forward replaced by the definition
(``minimax_h3_reference``), every call given the NAG negative encoded by diffusers' own Qwen3-VL encoding and fitted
to the prompt's token count (cut, or its last row repeated: docs/families/minimax_h3.md); nag_end; pre-encoded
negatives; no NAG arguments, nag_scale=1 and remove_nag reproduce the stock blocks bit for bit.
"""

from __future__ import annotations

import minimax_h3_reference
import minimax_h3_toy as toy
import modular_toy
import pytest
import torch
from diffusers.modular_pipelines import MiniMaxH3Blocks
from diffusers.modular_pipelines.minimax_h3.encoders import get_qwen3vl_prompt_embeds
from nag_kernels.integrations import apply_nag, modular, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a fox runs in snow , birds sing"  # 8 tokens
SHORT = "blurry dark"  # 2 tokens: padded to 8
LONG = "blurry dark low quality noisy distorted audio , red blue sky"  # 11 tokens: cut to 8
COMMON = dict(height=32, width=32, num_frames=120, num_inference_steps=3)  # 37 latent frames, 414 audio rows


@pytest.fixture(scope="module")
def pipe():
    blocks = MiniMaxH3Blocks()
    blocks.sub_blocks.pop("decode")  # no VAEs: the tests compare the denoised latents
    pipe = blocks.init_pipeline()
    with modular_toy.quiet():
        pipe.update_components(**toy.modular_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=PROMPT, **kw):
    with modular_toy.quiet():
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output=["latents", "audio_latents"],
                   **{**COMMON, **kw})
    return out["latents"], out["audio_latents"]


def encode(pipe, text: str) -> torch.Tensor:
    """diffusers' MiniMax-H3 encoding of ``text`` (``[1, T_text, 16]``)."""
    ids = pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return get_qwen3vl_prompt_embeds(pipe.text_encoder, pipe.processor, ids, {}, text_encoder_layer=50,
                                         dtype=torch.float64)


def fitted(negative: torch.Tensor, length: int) -> torch.Tensor:
    """The definition's fit of the negative to the prompt's ``length`` tokens (written here, not the family's)."""
    if negative.shape[1] >= length:
        return negative[:, :length]
    pad = negative[:, -1:].repeat(1, length - negative.shape[1], 1)
    return torch.cat([negative, pad], dim=1)


def reference_run(pipe, negative, end=1.0, **nag):
    """The stock blocks with the transformer's forward replaced by the definition (NAG while ``1 - min(t) >=
    1 - end``)."""
    model = pipe.transformer

    def forward(hidden_states, audio_hidden_states, encoder_hidden_states, timestep, timestep_indices, token_tags,
                position_ids, video_indices, audio_indices, text_indices, attention_kwargs=None, return_dict=True):
        text = encoder_hidden_states
        if negative is not None and 1 - float(timestep.min()) >= 1 - end:
            text = torch.cat([text, fitted(negative, text.shape[1]).to(text.dtype)])
        with torch.no_grad():
            return minimax_h3_reference.minimax_h3_forward(
                model, hidden_states, audio_hidden_states, text, timestep, timestep_indices, token_tags,
                position_ids, video_indices, audio_indices, text_indices, **nag)

    model.forward = forward
    try:
        return generate(pipe)
    finally:
        del model.forward


def close(got, expected, atol=1e-6):  # the loop steps the latents in float32
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


@pytest.mark.parametrize("negative", [SHORT, LONG], ids=["shorter-padded", "longer-cut"])
def test_nag_equals_the_definition_through_the_stock_blocks(pipe, negative):
    stock = generate(pipe)
    expected = reference_run(pipe, encode(pipe, negative), nag_scale=7.0, nag_tau=2.0)
    nag_pipe = apply_nag(pipe) or pipe
    try:
        got = generate(nag_pipe, nag_negative_prompt=negative, nag_scale=7.0, nag_tau=2.0)
        close(got, expected)
        assert (got[0] - stock[0]).abs().max() > 2e-5  # NAG acts (the 414 audio rows dilute the text here)
    finally:
        remove_nag(pipe)


def test_nag_end_and_pre_encoded_negatives(pipe):
    apply_nag(pipe)
    try:
        by_text = generate(pipe, nag_negative_prompt=SHORT, nag_end=0.5)
        by_embeds = generate(pipe, nag_negative_prompt_embeds=encode(pipe, SHORT), nag_end=0.5)
    finally:
        remove_nag(pipe)
    close(by_embeds, by_text, atol=0)
    close(by_text, reference_run(pipe, encode(pipe, SHORT), end=0.5))


def test_without_nag_arguments_scale_one_and_after_removal_the_stock_blocks(pipe):
    stock = generate(pipe)
    apply_nag(pipe)
    try:
        close(generate(pipe), stock, atol=0)
        close(generate(pipe, nag_negative_prompt=SHORT, nag_scale=1.0), stock, atol=0)
    finally:
        remove_nag(pipe)
    close(generate(pipe), stock, atol=0)


def test_every_workflow_denoiser_is_wrapped_both_partitions(pipe):
    """t2va and fl2va call ``transformer``, ref2va ``transformer_ref``: the family guides both partitions."""
    apply_nag(pipe)
    try:
        wrapped = {}

        def walk(block, path=""):
            for name, sub in getattr(block, "sub_blocks", {}).items():
                if isinstance(sub, modular.NAGLoopDenoiser):
                    wrapped[path + name] = sub.denoiser.transformer_name
                walk(sub, f"{path}{name}.")

        walk(pipe.blocks)
        assert wrapped == {"denoise.ref2va.denoise.denoiser": "transformer_ref",
                           "denoise.fl2va.denoise.denoiser": "transformer",
                           "denoise.t2va.denoise.denoiser": "transformer"}
    finally:
        remove_nag(pipe)
