"""apply_nag on a ZImageTransformer2DModel: exact and fast mode against an independent float64 implementation of the
2B layout (captions of other lengths than the prompt's included), plain calls and removal bit-identical, CFG
batches, nag_end on Z-Image's reversed timestep, refusals."""

from __future__ import annotations

import pytest
import torch

import zimage_reference
import zimage_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")


def run(model, x, t, caps, **jak):
    with torch.no_grad():
        return model(x, t, caps, joint_attention_kwargs=jak or None, return_dict=False)[0]


def reference(model, x, t, caps, **nag):
    with torch.no_grad():
        return zimage_reference.zimage_forward(model, x, t, caps, **nag)


def close(a, b, atol=1e-10):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=atol)


def t_of(batch, value=0.3):
    return torch.full((batch,), value, dtype=torch.float64)


# caption lengths: positive rows, then NAG-negative rows (5 -> 32 tokens, 40 -> 64: other padded lengths)
CASES = {"b1-longer-negative": [5, 40], "b1-same": [20, 9], "b2-mixed": [5, 40, 12, 33]}


@pytest.mark.parametrize("lengths", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_and_fast_equal_the_2b_layout(norm, lengths):
    model = zimage_toy.transformer().double()
    batch = len(lengths) // 2
    x, caps, t = zimage_toy.latents(batch), zimage_toy.captions(lengths), t_of(batch)
    plain = run(model, x, t, caps[:batch])
    for mode in ("exact", "fast"):
        apply_nag(model, norm=norm, mode=mode, backend="torch")
        for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):
            out = run(model, x, t, caps, **call)
            close(out, reference(model, x, t, caps, norm=norm, **call))
            assert max((o - p).abs().max() for o, p in zip(out, plain)) > 1e-5  # NAG acts
    remove_nag(model)


def test_negative_equal_to_positive_scale_one_and_plain_calls_reproduce_the_model():
    model = zimage_toy.transformer().double()
    x, caps, t = zimage_toy.latents(2), zimage_toy.captions([5, 40]), t_of(2)
    plain = run(model, x, t, caps)
    apply_nag(model, backend="torch")
    close(run(model, x, t, caps + caps), plain, atol=1e-12)
    other = zimage_toy.captions([7, 9], seed=5)
    assert all(torch.equal(a, b) for a, b in zip(run(model, x, t, caps + other, nag_scale=1.0), plain))
    assert all(torch.equal(a, b) for a, b in zip(run(model, x, t, caps), plain))


def processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def test_remove_nag_is_bit_identical():
    model = zimage_toy.transformer().double()
    x, caps, t = zimage_toy.latents(1), zimage_toy.captions([5, 40]), t_of(1)
    before = processors(model)
    plain = run(model, x, t, caps[:1])
    apply_nag(model, backend="torch")
    run(model, x, t, caps)
    remove_nag(model)
    assert all(processors(model)[name] is p for name, p in before.items())
    assert not any(name in model.__dict__ for name in ("patchify_and_embed", "_build_unified_sequence", "_nag_call"))
    assert torch.equal(run(model, x, t, caps[:1])[0], plain[0])


def test_cfg_batch_guides_the_conditional_rows_only():
    # The pipelines' CFG call: latents [cond ; uncond], captions [positive ; cfg ; NAG negative ; cfg].
    model = zimage_toy.transformer().double()
    pos, cfg, neg = (zimage_toy.captions([n], seed=s) for n, s in ((9, 1), (4, 2), (40, 3)))
    x = zimage_toy.latents(1) * 2
    apply_nag(model, backend="torch")
    out = run(model, x, t_of(2), pos + cfg + neg + cfg)
    close(out[:1], reference(model, x[:1], t_of(1), pos + neg))
    close(out[1:], reference(model, x[1:], t_of(1), cfg), atol=1e-12)


def test_nag_end_reads_the_noise_level_from_one_minus_t():
    model = zimage_toy.transformer().double()
    x, caps = zimage_toy.latents(1), zimage_toy.captions([5, 40])
    apply_nag(model, nag_end=0.5, backend="torch")  # on while sigma >= 0.5, i.e. t <= 0.5
    late = t_of(1, 0.8)
    assert torch.equal(run(model, x, late, caps)[0], run(model, x, late, caps[:1])[0])
    close(run(model, x, t_of(1, 0.2), caps), reference(model, x, t_of(1, 0.2), caps))


def test_auto_backend_float32():
    model = zimage_toy.transformer()
    x, caps, t = zimage_toy.latents(1, dtype=torch.float32), zimage_toy.captions([5, 40], dtype=torch.float32), t_of(1)
    apply_nag(model)  # "auto": the Triton interpreter on CPU
    out = run(model, x, t.float(), caps)
    expected = reference(model.double(), [v.double() for v in x], t, [c.double() for c in caps])
    close([o.double() for o in out], expected, atol=1e-4)


def test_refusals_name_the_input():
    model = zimage_toy.transformer().double()
    x, caps, t = zimage_toy.latents(2), zimage_toy.captions([5, 40, 6, 7]), t_of(2)
    apply_nag(model, backend="torch")
    with pytest.raises(ValueError, match="cap_feats must have the batch of x"):
        run(model, x, t, caps[:3])
    with pytest.raises(ValueError, match="latents of one size"):
        run(model, [x[0], torch.randn(4, 1, 16, 16, dtype=torch.float64)], t, caps)
    with pytest.raises(NotImplementedError, match="controlnet_block_samples"):
        with torch.no_grad():
            model(x, t, caps, controlnet_block_samples={0: torch.zeros(1)})
