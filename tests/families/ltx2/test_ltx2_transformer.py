"""apply_nag on LTX2VideoTransformer3DModel (LTX-2.0, 2.3, 2.5 and the mixed configuration): the guided forward
against the independent float64 2B-layout computation of ``ltx2_reference`` (both streams, a text mask per branch
and per stream, batches, batched CFG, STG and modality isolation beside NAG), the off cases, removal, bad input,
fully masked rows, torch.compile and autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor

import ltx2_toy
from ltx2_reference import reference_forward, reference_model
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

T = ltx2_toy.SEQ_LEN
GRID = (3, 2, 2)  # latent frames, height, width: 12 video tokens
AUDIO = 5
PER_TEXT_ROW = ("encoder_hidden_states", "audio_encoder_hidden_states", "encoder_attention_mask",
                "audio_encoder_attention_mask")
VERSIONS = ltx2_toy.VERSIONS


def inputs(version, rows=2, text_rows=4, seed=0, masks=True, timestep=700.0):
    g = torch.Generator().manual_seed(seed)
    width, audio_width = ltx2_toy.text_width(version)
    f64 = dict(dtype=torch.float64, generator=g)
    kw = dict(
        hidden_states=torch.randn(rows, GRID[0] * GRID[1] * GRID[2], ltx2_toy.CHANNELS, **f64),
        audio_hidden_states=torch.randn(rows, AUDIO, ltx2_toy.AUDIO_CHANNELS, **f64),
        encoder_hidden_states=torch.randn(text_rows, T, width, **f64),
        audio_encoder_hidden_states=torch.randn(text_rows, T, audio_width, **f64),
        timestep=torch.linspace(timestep - 100, timestep, rows, dtype=torch.float64),
        sigma=torch.linspace(timestep - 100, timestep, rows, dtype=torch.float64) / 1000,
        num_frames=GRID[0], height=GRID[1], width=GRID[2], audio_num_frames=AUDIO,
    )
    if masks:  # left padding of a different length per text row, and another one for the audio stream
        video = torch.ones(text_rows, T)
        for row in range(text_rows):
            video[row, : 2 + row % 5] = 0
        kw["encoder_attention_mask"] = video
        kw["audio_encoder_attention_mask"] = video.roll(1, 0)
    return kw


def plain_rows(kw, rows):
    return {k: (v[:rows] if k in PER_TEXT_ROW and v is not None else v) for k, v in kw.items()}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)


def close(out, expected, atol=1e-10):
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=atol)


def moved(out, plain, rows=slice(None)):
    return min((o - p)[rows].abs().max().item() for o, p in zip(out, plain))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("layout", [(1, 2), (2, 4), (4, 6)], ids=["B1", "B2", "batched-cfg"])
def test_guided_forward_equals_the_float64_reference(version, layout):
    rows, text_rows = layout
    model = ltx2_toy.transformer(version).double()
    kw = inputs(version, rows, text_rows)
    stock = run(model, plain_rows(kw, rows))
    refs = {9.0: reference_model(model), 11.0: reference_model(model, 11.0, 1.2, 0.5)}
    apply_nag(model, backend="torch")
    for scale, ref in refs.items():
        call = {} if scale == 9.0 else {"nag_scale": 11.0, "nag_tau": 1.2, "nag_alpha": 0.5}
        out = run(model, kw, **call)
        close(out, reference_forward(ref, **kw))
        guided = slice(2 * rows - text_rows, rows)
        assert moved(out, stock, guided) > 1e-3  # NAG moved both streams: the equality is not vacuous
    assert all(torch.equal(a, b) for a, b in zip(run(model, plain_rows(kw, rows)), stock))  # plain calls: stock
    if text_rows < 2 * rows:  # batched CFG: the unconditional rows are plain
        unguided = 2 * rows - text_rows
        assert all(torch.equal(a[:unguided], b[:unguided]) for a, b in zip(out, stock))
    no_mask = {**kw, "encoder_attention_mask": None, "audio_encoder_attention_mask": None}
    assert moved(run(model, no_mask), out) > 1e-4  # the masks matter
    close(run(model, no_mask), reference_forward(refs[9.0], **no_mask))


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_the_audio_stream_takes_its_own_settings(version):
    model = ltx2_toy.transformer(version).double()
    kw = inputs(version, 2, 3)  # batched CFG: one guided row
    own = {"scale": 4.0, "tau": 2.0, "alpha": 0.75}
    ref, ref_video_only = reference_model(model, 11.0, 1.5, 0.5, audio=own), reference_model(
        model, 11.0, 1.5, 0.5, audio={"scale": 1.0})
    stock = run(model, plain_rows(kw, 2))
    apply_nag(model, backend="torch")
    call = {"nag_scale": 11.0, "nag_tau": 1.5, "nag_alpha": 0.5}
    out = run(model, kw, **call, **{f"audio_nag_{k}": v for k, v in own.items()})
    close(out, reference_forward(ref, **kw))
    video_only = run(model, kw, **call, audio_nag_scale=1.0)  # NAG on the video stream only
    close(video_only, reference_forward(ref_video_only, **kw))
    assert moved(video_only, out) > 1e-4 and (video_only[0] - stock[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="audio_nag_scale must be >= 1, got 0.5"):
        run(model, kw, audio_nag_scale=0.5)
    with pytest.raises(TypeError, match="audio_nag_tau must be a number"):
        run(model, kw, audio_nag_tau="2")
    assert all(torch.equal(a, b) for a, b in zip(run(model, plain_rows(kw, 2), audio_nag_scale=4.0), stock))


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_stg_and_modality_isolation_beside_nag(version):
    model = ltx2_toy.transformer(version).double()
    kw = {**inputs(version), "isolate_modalities": True}
    ref = reference_model(model)
    apply_nag(model, backend="torch")
    close(run(model, kw), reference_forward(ref, **kw))
    if version == "2.3":  # STG-capable processors (perturbed_attn): the self-attention perturbed in block 1
        stg = {**kw, "isolate_modalities": False, "spatio_temporal_guidance_blocks": [1]}
        out = run(model, stg)
        close(out, reference_forward(ref, **stg))
        assert moved(out, run(model, kw)) > 1e-4


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_off_cases_and_remove(version):
    model = ltx2_toy.transformer(version).double()
    kw = inputs(version)
    plain = run(model, plain_rows(kw, 2))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(run(model, kw, nag_scale=1.0), plain))
    assert all(torch.equal(a, b) for a, b in zip(run(model, kw, nag_end=0.2), plain))  # t = 700 < 800: off
    assert moved(run(model, kw, nag_end=0.4), plain) > 1e-3  # t = 600, 700 >= 600: on
    same = dict(kw)
    for name in PER_TEXT_ROW:
        same[name] = torch.cat([kw[name][:2]] * 2)
    close(run(model, same), plain, atol=1e-12)  # NAG-negative == positive: the stock output
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks and not model._forward_hooks
    assert not any(any(k.startswith("_nag") or k in ("forward", "get_mod_params") for k in m.__dict__)
                   for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(run(model, plain_rows(kw, 2)), plain))


def test_fully_masked_rows_give_no_nan():
    """A NAG-negative (or positive) row whose text mask hides every token: finite output, as the stock model's
    -10000 bias gives, whatever the mask's form (the model's 0/1 mask, a boolean or -inf bias of the text rows)."""
    model = ltx2_toy.transformer("2.3").double()
    kw = inputs("2.3")
    for name in ("encoder_attention_mask", "audio_encoder_attention_mask"):
        kw[name][2:] = 0  # the NAG-negative rows: no token
    ref = reference_model(model)
    apply_nag(model, backend="torch")
    out = run(model, kw)
    assert all(torch.isfinite(o).all() for o in out)
    close(out, reference_forward(ref, **kw))
    bias = {**kw}
    for name in ("encoder_attention_mask", "audio_encoder_attention_mask"):
        bias[name] = torch.zeros(4, 1, T, dtype=torch.float64).masked_fill(kw[name][:, None] == 0, float("-inf"))
    out_inf = run(model, bias)
    assert all(torch.isfinite(o).all() for o in out_inf)
    boolean = {**kw, **{name: kw[name][:, None].bool() for name in ("encoder_attention_mask",
                                                                    "audio_encoder_attention_mask")}}
    assert all(torch.isfinite(o).all() for o in run(model, boolean))
    empty = {**kw, "encoder_attention_mask": torch.zeros(4, T), "audio_encoder_attention_mask": torch.zeros(4, T)}
    assert all(torch.isfinite(o).all() for o in run(model, empty))  # every row, positive too


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(ltx2_toy.transformer("2.3").double(), backend="torch")
    kw = inputs("2.3")
    with pytest.raises(ValueError, match="audio_encoder_hidden_states must have batch 4"):
        run(model, {**kw, "audio_encoder_hidden_states": kw["audio_encoder_hidden_states"][:2]})
    with pytest.raises(ValueError, match="encoder_attention_mask must have batch 4"):
        run(model, {**kw, "encoder_attention_mask": kw["encoder_attention_mask"][:2]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have width 16, got 8"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :8]})
    with pytest.raises(ValueError, match="audio_encoder_hidden_states must have width 8, got 4"):
        run(model, {**kw, "audio_encoder_hidden_states": kw["audio_encoder_hidden_states"][..., :4]})
    with pytest.raises(ValueError, match="sigma must have the 2 rows of hidden_states"):
        run(model, {**kw, "sigma": torch.full((4,), 0.7, dtype=torch.float64)})
    with pytest.raises(ValueError, match="audio_hidden_states must have the 2 rows"):
        run(model, {**kw, "audio_hidden_states": torch.cat([kw["audio_hidden_states"]] * 2)})
    with pytest.raises(ValueError, match="audio_encoder_hidden_states is required"):
        run(model, {**kw, "audio_encoder_hidden_states": None})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, **{name: torch.cat([kw[name]] * 2)[:5] for name in PER_TEXT_ROW}})
    model.transformer_blocks[1].audio_attn2.set_processor(LTX2AudioVideoAttnProcessor())
    with pytest.raises(RuntimeError, match="transformer_blocks.1.audio_attn2 uses LTX2AudioVideoAttnProcessor"):
        run(model, kw)
    apply_nag(model, backend="torch")
    ref = reference_model(remove_nag(copy.deepcopy(model)))
    close(run(model, kw), reference_forward(ref, **kw))


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = ltx2_toy.transformer("2.0", layers=1).double()
    kw = inputs("2.0")
    expected = reference_forward(reference_model(model), **kw)
    apply_nag(model, backend="torch")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    close(run(compiled, kw), expected)


def _exact_float64(monkeypatch):
    """LTX-2 computes two things in float32 whatever the dtype: diffusers' ``RMSNorm`` variance and the RoPE
    rotation (``x.float()``). Finite differences in float64 need the whole forward in float64: both replaced, for
    this test only, by the same formulas in the input's dtype."""
    from diffusers.models import normalization
    from diffusers.models.transformers import transformer_ltx2

    def rms_forward(self, hidden_states):
        out = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * self.weight if self.weight is not None else out

    def interleaved(x, freqs):
        cos, sin = freqs
        real, imag = x.unflatten(2, (-1, 2)).unbind(-1)
        return x * cos.to(x.dtype) + torch.stack([-imag, real], dim=-1).flatten(2) * sin.to(x.dtype)

    def split(x, freqs):
        cos, sin = (f.to(x.dtype) for f in freqs)
        reshaped = x.ndim != 4 and cos.ndim == 4
        if reshaped:
            b, h, t, _ = cos.shape
            x = x.reshape(b, t, h, -1).swapaxes(1, 2)
        first, second = x.unflatten(-1, (2, -1)).unbind(-2)
        out = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return out.swapaxes(1, 2).reshape(b, t, -1) if reshaped else out

    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_forward)
    monkeypatch.setattr(transformer_ltx2, "apply_interleaved_rotary_emb", interleaved)
    monkeypatch.setattr(transformer_ltx2, "apply_split_rotary_emb", split)


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_autograd_in_float64_against_finite_differences(version, monkeypatch):
    """NAG-guided fine-tuning backpropagates through the guided forward: ``gradcheck`` (finite differences, the
    forward in float64 throughout, ``_exact_float64``) on the video latents, both streams' text rows (positive and
    NAG-negative) and a bias of the video text cross-attention; and the latents' gradient equal to the float64
    reference's autograd gradient."""
    _exact_float64(monkeypatch)
    model = ltx2_toy.transformer(version, layers=1).double()
    ref = reference_model(model)
    apply_nag(model, backend="torch")
    kw = inputs(version, rows=1, text_rows=2)
    for name in PER_TEXT_ROW:
        kw[name] = kw[name][:, -4:]  # 4 text tokens (2 of them masked in the negative row)
    kw["hidden_states"] = kw["hidden_states"][:, :4]  # a 1x2x2 grid
    kw["num_frames"] = 1
    bias = model.transformer_blocks[0].attn2.to_k.bias

    def f(hidden, text, audio_text, b):
        with torch.nn.utils.stateless._reparametrize_module(model, {"transformer_blocks.0.attn2.to_k.bias": b}):
            return model(**{**kw, "hidden_states": hidden, "encoder_hidden_states": text,
                            "audio_encoder_hidden_states": audio_text}, return_dict=False)

    args = [x.detach().clone().requires_grad_() for x in
            (kw["hidden_states"], kw["encoder_hidden_states"], kw["audio_encoder_hidden_states"], bias.detach())]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=True)

    def latent_grad(forward):
        hidden = kw["hidden_states"].detach().clone().requires_grad_()
        with torch.enable_grad():
            video, audio = forward({**kw, "hidden_states": hidden})
            (video.square().sum() + audio.sin().sum()).backward()
        return hidden.grad

    ours = latent_grad(lambda k: model(**k, return_dict=False))
    torch.testing.assert_close(ours, latent_grad(lambda k: _reference_with_grad(ref, k)), rtol=0, atol=1e-10)
    assert ours.abs().max() > 1e-3


def _reference_with_grad(ref, kw):
    rows, guided = kw["hidden_states"].shape[0], kw["encoder_hidden_states"].shape[0] - kw["hidden_states"].shape[0]
    ref._reference_settings["guided"] = guided
    try:
        full = {k: (torch.cat([v, v[rows - guided:]]) if k in ("hidden_states", "audio_hidden_states", "timestep",
                                                                  "sigma") else v) for k, v in kw.items()}
        video, audio = ref(**full, return_dict=False)
    finally:
        ref._reference_settings["guided"] = 0
    return video[:rows], audio[:rows]
