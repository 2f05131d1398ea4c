"""apply_nag on Kandinsky6Transformer3DModel: the guided forward against the independent float64 definition
(``kandinsky6_reference``) with both modalities and a text mask per branch, the off cases and stock equivalence,
removal, autograd against finite differences, bad input and the parallel refusal (gradient checkpointing:
tests/core/test_gradient_checkpointing.py).

The model computes its norms, modulation affines, gates and RoPE in float32 whatever its dtype; the reference is all
float64, so the two agree to ~1e-6 (``ATOL`` 1e-5), where NAG moves the outputs by ~1e-2.
"""

from __future__ import annotations

import pytest
import torch

import kandinsky6_toy as toy  # first: it skips this module on a diffusers without Kandinsky 6
import kandinsky6_reference as reference
from diffusers.models.transformers.transformer_kandinsky6 import Kandinsky6AttnProcessor
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5  # the model's float32 internals against the float64 reference (module docstring)
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25}  # the family's recommended settings


def close(actual, expected, atol=ATOL):
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a.to(torch.float64), e, rtol=0, atol=atol)


def moved(out, plain, by=1e-3):
    return all(o is None or (o - p).abs().max() > by for o, p in zip(out, plain))


@pytest.mark.parametrize("case", [
    dict(),
    dict(batch=1, audio=False),
    dict(image_tail=True, flags=toy.DEFAULT_FLAGS),
    dict(mask=False, pooled_rows=4, dtype=torch.float32),
], ids=["video-audio-mask", "video-only-b1", "i2v-tail-default-flags", "no-mask-pooled-2b-float32"])
def test_guided_forward_equals_the_definition(case):
    case = dict(case)
    flags, dtype, batch = case.pop("flags", {}), case.pop("dtype", torch.float64), case.pop("batch", 2)
    model = toy.transformer(**flags).to(dtype)
    kw = toy.inputs(batch, dtype=dtype, **case)
    stock = toy.run(model, toy.plain(kw))
    close(stock, reference.forward(model, **toy.plain(kw)))
    apply_nag(model, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), stock) if a is not None)
    out = toy.run(model, kw)
    close(out, reference.forward(model, **kw, **DEFAULTS))
    assert moved(out, stock)
    apply_nag(model, nag_scale=5.0, nag_tau=2.0, nag_alpha=0.5, backend="torch")  # a direct call's settings
    out = toy.run(model, kw)
    close(out, reference.forward(model, **kw, scale=5.0, tau=2.0, alpha=0.5))
    if kw.get("encoder_attention_mask") is not None:  # the masks count, per branch
        ones = {**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])}
        assert moved(toy.run(model, ones), out, by=1e-4)


def test_the_negative_text_is_modulated_with_the_positive_pooled_vector():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    out = toy.run(model, kw)
    negative_pooled = {**kw, "pooled_projections": torch.cat([kw["pooled_projections"], -kw["pooled_projections"]])}
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, negative_pooled), out))  # its rows are not used
    other = {**kw, "pooled_projections": -kw["pooled_projections"]}
    assert moved(toy.run(model, other), out)


def test_off_cases_stock_equivalence_and_remove():
    model = toy.transformer().double()
    kw = toy.inputs()  # timestep 700
    stock = toy.run(model, toy.plain(kw))
    processors = dict(model.attn_processors)
    apply_nag(model, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), stock))
    apply_nag(model, nag_scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, kw), stock))  # NAG off: the plain forward
    apply_nag(model, nag_scale=9.0, nag_end=0.25)
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, kw), stock))  # 700 < 750: off
    apply_nag(model, nag_end=0.3)
    assert moved(toy.run(model, kw), stock)  # 700 >= 700: on
    apply_nag(model, nag_end=1.0)
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:2]] * 2),
            "encoder_attention_mask": torch.cat([kw["encoder_attention_mask"][:2]] * 2)}
    close(toy.run(model, same), stock, atol=1e-12)  # negative == positive: the stock outputs
    remove_nag(model)
    assert dict(model.attn_processors) == processors
    assert all(type(p) is Kandinsky6AttnProcessor for p in model.attn_processors.values())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(any(k.startswith("_nag") or k == "forward" for k in m.__dict__) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), stock))


def test_float32_patched_model_without_nag_is_bit_identical_to_stock():
    model = toy.transformer()
    kw = toy.inputs(dtype=torch.float32, image_tail=True)
    stock = toy.run(model, toy.plain(kw))
    apply_nag(model)
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), stock))
    positional = toy.plain(kw)
    with torch.no_grad():
        out = model(positional.pop("hidden_states"), positional.pop("encoder_hidden_states"),
                    positional.pop("pooled_projections"), positional.pop("timestep"), **positional, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(out, stock))


def _finite_difference(loss, x, direction, eps=1e-6):
    return (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)


def test_autograd_matches_finite_differences():
    model = apply_nag(toy.transformer(blocks=1).double(), backend="torch")
    kw = toy.inputs(1)
    weight = model.visual_transformer_blocks[0].audio_dec_block.cross_attention.to_value.weight
    g = torch.Generator().manual_seed(3)
    probe_v = torch.randn(toy.run(model, kw)[0].shape, generator=g, dtype=torch.float64)
    probe_a = torch.randn(kw["audio_hidden_states"].shape, generator=g, dtype=torch.float64)

    def loss(x, w=None):
        original = weight.data.clone()
        if w is not None:
            weight.data.copy_(w)
        try:
            video, audio = model(**{**kw, "hidden_states": x}, return_dict=False)
            return (video * probe_v).sum() + (audio * probe_a).sum()
        finally:
            weight.data.copy_(original)

    x = kw["hidden_states"].clone().requires_grad_(True)
    loss(x).backward()
    dx, dw = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, weight))
    # float32 internals: the finite difference is good to ~1e-4 relative
    torch.testing.assert_close((x.grad * dx).sum(), _finite_difference(loss, x.detach(), dx, 1e-3), rtol=2e-3,
                               atol=1e-4)
    torch.testing.assert_close((weight.grad * dw).sum(),
                               _finite_difference(lambda w: loss(kw["hidden_states"], w), weight.detach().clone(), dw,
                                                  1e-3), rtol=2e-3, atol=1e-4)
    assert weight.grad.abs().max() > 0


def test_bad_input_is_refused_naming_the_argument():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    cases = [
        ({"encoder_hidden_states": kw["encoder_hidden_states"][..., :16]},
         r"encoder_hidden_states must be \[2B, T, in_text_dim=32\]"),
        ({"encoder_hidden_states": torch.cat([kw["encoder_hidden_states"], kw["encoder_hidden_states"][:2]])},
         r"encoder_hidden_states must have the batch of hidden_states \(2, a plain forward\) or twice it"),
        ({"encoder_attention_mask": kw["encoder_attention_mask"][:2]}, "encoder_attention_mask must have batch 4"),
        ({"pooled_projections": torch.cat([kw["pooled_projections"]] * 3)},
         "pooled_projections must have batch 2 or 4 in a NAG call"),
        ({"pooled_projections": kw["pooled_projections"][:, :8]}, r"pooled_projections must be \[B or 2B, in_text"),
        ({"timestep": torch.cat([kw["timestep"]] * 2)},
         r"timestep must have the batch of hidden_states \(2\) in a NAG call, got 4"),
        ({"audio_hidden_states": kw["audio_hidden_states"][:1]},
         r"audio_hidden_states must have the batch of hidden_states \(2\) in a NAG call, got 1"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            toy.run(model, {**kw, **change})
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))  # nothing left behind


def test_a_parallel_config_is_refused_for_guided_calls_only():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    processor = model.visual_transformer_blocks[1].audio_dec_block.cross_attention.processor
    processor._parallel_config = config  # what enable_parallelism sets on each processor
    with pytest.raises(NotImplementedError, match="no context-parallel plan .* for Kandinsky6Transformer3DModel"):
        toy.run(model, kw)
    processor._parallel_config = None
    model._parallel_config = config  # and on the model
    with pytest.raises(NotImplementedError, match="NAG cannot guide this Kandinsky6Transformer3DModel"):
        toy.run(model, kw)
    model._parallel_config = None
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))
