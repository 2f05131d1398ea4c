"""apply_nag on a QwenImageTransformer2DModel: the 2B contract with per-branch text masks equals the independent
float64 computation; plain calls unchanged; removal exact; errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

import qwenimage_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, N = 2, 8, 64


def inputs(masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    if masked:  # each row its own padding, the NAG-negative rows shorter
        for row, length in enumerate((8, 6, 3, 5)):
            mask[row, length:] = 0
    return dict(
        hidden_states=torch.randn(B, N, 16, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2 * B, T, qwenimage_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        encoder_hidden_states_mask=mask if masked else None,
        timestep=torch.full((B,), 0.6, dtype=torch.float64),
        img_shapes=[[(1, qwenimage_toy.SIDE, qwenimage_toy.SIDE)]] * B,
    )


def positive(kw):
    mask = kw["encoder_hidden_states_mask"]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:B],
            "encoder_hidden_states_mask": None if mask is None else mask[:B]}


def run(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return qwenimage_toy.qwen_forward(model, kw["hidden_states"], kw["encoder_hidden_states"],
                                          kw["encoder_hidden_states_mask"], kw["timestep"], kw["img_shapes"], **nag)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_guided_forward_equals_the_independent_computation(masked):
    model = qwenimage_toy.transformer().double()
    kw = inputs(masked)
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-10)
    apply_nag(model, backend="torch")
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):
        out = run(model, kw, **call)
        torch.testing.assert_close(out, reference(model, kw, **call), rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-4


def test_unsplit_path_under_another_attention_backend_is_the_same_computation():
    model = apply_nag(qwenimage_toy.transformer().double(), backend="torch")
    kw = inputs()
    model.set_attention_backend("_native_math")  # a PyTorch backend: the split path
    expected = reference(model, kw)
    for processor in model.attn_processors.values():
        processor.backend_is_torch = lambda: False  # as under flash-attn / sage: the unsplit per-branch attention
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_off_cases_and_remove_are_the_plain_forward():
    model = qwenimage_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "encoder_hidden_states_mask": torch.cat([kw["encoder_hidden_states_mask"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    assert all(type(p.inner) is QwenDoubleStreamAttnProcessor2_0 for p in model.attn_processors.values())
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks
    assert not any("_modulate" in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, positive(kw)), plain)


def test_bad_input_gets_clear_errors():
    model = apply_nag(qwenimage_toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states_mask must have batch 4"):
        run(model, {**kw, "encoder_hidden_states_mask": kw["encoder_hidden_states_mask"][:B]})
    with pytest.raises(ValueError, match="img_shapes must have one entry per latent sample"):
        run(model, {**kw, "img_shapes": kw["img_shapes"] * 3})
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
