"""NAG on Wan Animate 2's modular blocks (WanAnimate2Blocks with its CFG guider on and off, WanAnimate2DistilledBlocks
with its guidance-1 guider and with CFG), through the family's modular declaration (its ``blocks`` hook puts
``wananimate2``'s NAG-aware denoise blocks in the copy ``apply_nag`` makes).

Against an independent computation: the stock blocks, whose transformer forward is replaced by the float64 definition
(``wananimate2_reference``) that appends the NAG negative's row on the conditional denoising calls (the NAG
negative encoded with the stock encoder function), so the whole segment loop (reference pass, KV cache, CFG, the
scheduler, the next segment's conditioning on the decoded tail) is the stock one. Also: the call pattern (NAG rows on
the conditional pass only, the reference pass plain), the stock blocks reproduced without NAG arguments and with
``nag_scale=1``, the NAG negative equal to the prompt, a pre-encoded negative, ``NAGGuidance`` with the NAG
text-encoder step composed by hand, remove_nag exact, the errors. These blocks take one ``str`` prompt and one video:
batches are tested on the transformer (tests/families/wananimate2/test_wananimate2_transformer.py).
"""

from __future__ import annotations

import copy
import functools

import modular_toy
import pytest
import torch
import wananimate2_reference as reference
import wananimate2_toy as toy
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.modular_pipelines import WanAnimate2Blocks, WanAnimate2DistilledBlocks
from diffusers.modular_pipelines.wan_animate_2.encoders import get_t5_prompt_embeds
from nag_kernels.integrations import NAGGuidance, apply_nag, modular, remove_nag
from nag_kernels.integrations.families import wananimate2
from nag_kernels.integrations.guided import state_of
from nag_kernels.integrations.modular import NAGTextEncoderStep

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

SETTINGS = (9.0, 3.5, 0.25)  # the family's recommended scale, tau, alpha
PROMPT, NEGATIVE = "a red cat", "blurry dark"


def frames(pipe, **kw):
    """Each segment's denoised latents, as the loop hands them to the VAE (it decodes every segment: the next one is
    conditioned on its decoded tail)."""
    call = {**toy.call_kwargs(kw.pop("video_frames", toy.FRAMES)), **kw}
    latents = []
    decode = pipe.vae.decode

    def recording(z, *args, **kwargs):
        latents.append(z.clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording
    try:
        with modular_toy.quiet():
            pipe(output="segment_frames", **call)
    finally:
        del pipe.vae.decode
    return latents


def pipeline(blocks_cls, cfg=None, **kw):
    pipe = toy.modular(blocks_cls, **kw)
    if cfg is not None:
        with modular_toy.quiet():
            pipe.update_components(guider=modular_toy.cfg(cfg))
    return pipe


@torch.no_grad()  # as the blocks encode (UMT5 picks other CPU kernels when recording gradients)
def encode(pipe, text):
    return get_t5_prompt_embeds(pipe.text_encoder, pipe.tokenizer, text, toy.TEXT_LEN, torch.device("cpu"))


def defined_forward(model, negative, scale=SETTINGS[0], tau=SETTINGS[1], alpha=SETTINGS[2], end=1.0, calls=None):
    """``model.forward`` replaced: a denoising call is the float64 definition, with ``negative``'s row appended on a
    conditional call while NAG is on (``t >= (1 - end) * 1000``); the reference pass is the stock one."""
    stock_forward = model.forward

    @functools.wraps(stock_forward)  # the denoise block reads the forward's signature
    def forward(hidden_states, *, encoder_hidden_states, kv_cache_mode, is_uncondtion=False, timestep, **kw):
        if kv_cache_mode != "cached":
            return stock_forward(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                 kv_cache_mode=kv_cache_mode, is_uncondtion=is_uncondtion, **kw)
        texts = list(encoder_hidden_states)
        if not is_uncondtion and scale > 1 and float(timestep.reshape(-1)[0]) >= (1 - end) * 1000:
            texts.append(negative[0])
        if calls is not None:
            calls.append(len(texts))
        out = reference.forward(model, hidden_states, texts, timestep=timestep, is_uncondtion=is_uncondtion,
                                scale=scale, tau=tau, alpha=alpha, **kw)
        return Transformer2DModelOutput(sample=[o.float() for o in out])

    return forward


def counting(model):
    calls = []

    def hook(module, args, kwargs):
        if kwargs["kv_cache_mode"] == "cached":
            calls.append(len(kwargs["encoder_hidden_states"]))
        else:
            calls.append(("extract", len(kwargs["encoder_hidden_states"])))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def close(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


CASES = {
    "cfg": (WanAnimate2Blocks, None, dict(negative_prompt="trees")),
    "no-cfg": (WanAnimate2Blocks, 1.0, {}),
    "distilled": (WanAnimate2DistilledBlocks, None, {}),
    "distilled-cfg": (WanAnimate2DistilledBlocks, 3.0, dict(negative_prompt="trees")),
    "nag_end": (WanAnimate2Blocks, None, dict(nag_end=0.5, nag_scale=7.0)),
    "two-segments": (WanAnimate2DistilledBlocks, None, dict(video_frames=9, nag_tau=1.5, nag_alpha=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_with_nag_match_the_independent_computation(case):
    blocks_cls, cfg, kw = CASES[case]
    kw = dict(kw)
    settings = dict(zip(("scale", "tau", "alpha"), SETTINGS))
    settings.update({name[4:]: kw[name] for name in ("nag_scale", "nag_tau", "nag_alpha", "nag_end") if name in kw})
    pipe = pipeline(blocks_cls, cfg)
    cfg_on = pipe.guider.guidance_scale > 1
    stock = frames(pipe, prompt=PROMPT, **{k: v for k, v in kw.items() if not k.startswith("nag_")})
    model = pipe.transformer
    defined_calls = []
    model.forward = defined_forward(model, encode(pipe, NEGATIVE), calls=defined_calls, **settings)
    try:
        want = frames(pipe, prompt=PROMPT, **kw)
    finally:
        del model.forward
    apply_nag(pipe, backend="torch")
    calls, hook = counting(model)
    got = frames(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE, **kw)
    hook.remove()
    close(got, want)
    assert max((g - s).abs().max() for g, s in zip(got, stock)) > 1e-2  # NAG moved the video
    segments = 2 if kw.get("video_frames") == 9 else 1
    per_step = [2, 1] if cfg_on else [2]
    assert calls == [("extract", 1), *per_step * 2] * segments  # NAG rows on the conditional pass only
    if case == "nag_end":  # 0.5: NAG on at the first step (t = 1000) only, the second (t = 750) plain
        assert defined_calls == [2, 1, 1, 1]
    else:
        assert defined_calls == [c for c in calls if not isinstance(c, tuple)]


@pytest.mark.parametrize("blocks_cls", [WanAnimate2Blocks, WanAnimate2DistilledBlocks])
def test_stock_without_nag_arguments_nag_scale_1_same_negative_and_remove(blocks_cls):
    pipe = pipeline(blocks_cls)
    original = pipe._blocks
    stock = frames(pipe, prompt=PROMPT)
    apply_nag(pipe, backend="torch")
    assert pipe._blocks is not original and wananimate2.patch_blocks(copy.deepcopy(pipe._blocks)) == 0
    assert wananimate2.RECORD == modular.RECORD  # the state entry the NAG-aware denoise blocks read
    assert all(torch.equal(a, b) for a, b in zip(frames(pipe, prompt=PROMPT), stock))
    assert all(torch.equal(a, b) for a, b in zip(frames(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE,
                                                         nag_scale=1.0), stock))
    close(frames(pipe, prompt=PROMPT, nag_negative_prompt=PROMPT), stock, atol=1e-6)  # the rounding of the combine
    embeds = encode(pipe, NEGATIVE)
    by_string = frames(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE)
    assert all(torch.equal(a, b) for a, b in zip(frames(pipe, prompt=PROMPT, nag_negative_prompt_embeds=embeds),
                                                 by_string))
    remove_nag(pipe)
    assert pipe._blocks is original and state_of(pipe.transformer) is None
    assert all(torch.equal(a, b) for a, b in zip(frames(pipe, prompt=PROMPT), stock))


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_nag_guidance_with_the_blocks_composed_by_hand(cfg):
    applied = pipeline(WanAnimate2DistilledBlocks, cfg)
    apply_nag(applied, backend="torch")
    kw = dict(prompt=PROMPT, nag_negative_prompt=NEGATIVE, nag_scale=7.0)
    if cfg > 1:
        kw["negative_prompt"] = "trees"
    want = frames(applied, **kw)
    remove_nag(applied)
    blocks = wananimate2.nag_blocks(WanAnimate2DistilledBlocks())
    blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
    pipe = toy.modular(None, blocks=blocks)
    with modular_toy.quiet():
        pipe.update_components(guider=NAGGuidance(guidance_scale=cfg))
    calls, hook = counting(pipe.transformer)
    got = frames(pipe, **kw)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert calls == [("extract", 1), *([2, 1] if cfg > 1 else [2]) * 2]


def test_errors():
    pipe = apply_nag(pipeline(WanAnimate2DistilledBlocks), backend="torch")
    with pytest.raises(ValueError, match="nag_negative_prompt must be one string or a list of 1 or 1"):
        frames(pipe, prompt=PROMPT, nag_negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="scale"):
        frames(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE, nag_scale=0.5)
    with pytest.raises(ValueError, match="nag_negative_prompt_embeds must have the per-row shape"):
        frames(pipe, prompt=PROMPT, nag_negative_prompt_embeds=torch.zeros(1, 5, toy.TEXT_DIM))
    with pytest.raises(ValueError, match="`prompt` has to be of type `str`"):  # the stock blocks' own refusal
        frames(pipe, prompt=[PROMPT], nag_negative_prompt=NEGATIVE)
