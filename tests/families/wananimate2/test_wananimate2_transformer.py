"""apply_nag on WanAnimate2Transformer3DModel: the guided denoising forward (``kv_cache_mode="cached"``) against the
independent float64 definition (``wananimate2_reference``) with and without the CLIP image branch, batches and
per-row text lengths, the reference pass (``"extract"``) plain whatever its text rows, the off cases and stock
equivalence, removal, autograd against the definition and finite differences, bad input and the parallel refusal.

The model computes its norms, modulation affines, gates and RoPE rotation (rounded to float32) in float32 whatever
its dtype, and returns float32: the reference is all float64, so the two agree to ~1e-6 (``ATOL`` 1e-5), where NAG
moves the output by ~1e-2. The stock generation pass runs flex attention eagerly on the CPU (torch warns that it
materializes the scores; at these sizes that is nothing).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan_animate_2 import (
    WanAnimate2AttnProcessor,
    WanAnimate2CrossAttnProcessor,
)

import wananimate2_reference as reference
import wananimate2_toy as toy
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.families.wananimate2 import NAGWanAnimate2CrossAttnProcessor

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

ATOL = 1e-5  # the model's float32 internals against the float64 reference (module docstring)
DEFAULTS = {"scale": 9.0, "tau": 3.5, "alpha": 0.25}  # the family's recommended settings


def close(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32  # the model's output is float32 whatever its dtype
        torch.testing.assert_close(a.to(torch.float64), e, rtol=0, atol=atol)


def equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def moved(out, plain, by=1e-3) -> bool:
    return all((o - p).abs().max() > by for o, p in zip(out, plain))


@pytest.mark.parametrize("case", [
    dict(),
    dict(batch=2, lengths=[8, 5, 3, 8]),
    dict(use_img_emb=False),
    dict(dtype=torch.float32, batch=2),
], ids=["b1-image", "b2-text-lengths", "no-image-branch", "float32-b2"])
def test_guided_forward_equals_the_definition(case):
    case = dict(case)
    dtype, batch, lengths = case.pop("dtype", torch.float64), case.pop("batch", 1), case.pop("lengths", None)
    model = toy.transformer(**case).to(dtype)
    kw = toy.inputs(model, batch, dtype=dtype, lengths=lengths)
    stock = toy.run(model, toy.plain(kw))
    close(stock, reference.forward(model, **toy.plain(kw)))
    apply_nag(model, backend="torch")
    assert equal(toy.run(model, toy.plain(kw)), stock)  # no NAG rows: the stock forward
    out = toy.run(model, kw)
    close(out, reference.forward(model, **kw, **DEFAULTS))
    assert moved(out, stock)
    apply_nag(model, nag_scale=5.0, nag_tau=2.0, nag_alpha=0.5, backend="torch")  # a direct call's settings
    close(toy.run(model, kw), reference.forward(model, **kw, scale=5.0, tau=2.0, alpha=0.5))
    apply_nag(model, nag_tau=1.0, backend="torch")  # the clamp acts
    clamped = toy.run(model, kw)
    close(clamped, reference.forward(model, **kw, scale=9.0, tau=1.0, alpha=0.25))
    apply_nag(model, nag_tau=1.0, norm="l2", backend="torch")
    assert not torch.equal(toy.run(model, kw)[0], clamped[0])  # the L2 clamp is another computation


def test_text_as_one_tensor_and_the_kernel_backend():
    model = toy.transformer().double()
    kw = toy.inputs(model, 2)
    want = reference.forward(model, **kw, **DEFAULTS)
    apply_nag(model)  # the default backend ("auto": the Triton kernels, interpreted on the CPU)
    close(toy.run(model, kw), want)
    stacked = {**kw, "encoder_hidden_states": torch.stack(kw["encoder_hidden_states"])}  # [2B, L, text_dim]
    close(toy.run(model, stacked), want)


def test_off_cases_stock_equivalence_and_remove():
    model = toy.transformer().double()
    pristine = toy.transformer().double()
    kw = toy.inputs(model, 2)
    stock = toy.run(pristine, toy.plain(kw))
    kinds = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    apply_nag(model, backend="torch")
    assert {type(b.cross_attn.processor) for b in model.blocks} == {NAGWanAnimate2CrossAttnProcessor}
    assert {type(b.self_attn.processor) for b in model.blocks} == {WanAnimate2AttnProcessor}  # never guided
    assert equal(toy.run(model, toy.plain(kw)), stock)
    assert equal(toy.run(model, {**kw, "is_uncondtion": True, **toy.plain(kw)}),
                 toy.run(pristine, {**toy.plain(kw), "is_uncondtion": True}))  # CFG's unconditional pass
    apply_nag(model, nag_scale=1.0, backend="torch")
    assert equal(toy.run(model, kw), stock)  # NAG off: the NAG rows are dropped, a plain forward
    apply_nag(model, nag_end=0.25, backend="torch")  # on while t >= 750
    assert equal(toy.run(model, {**kw, "timestep": torch.tensor([700.0], dtype=torch.float64)}),
                 toy.run(pristine, {**toy.plain(kw), "timestep": torch.tensor([700.0], dtype=torch.float64)}))
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))  # t = 900: on
    apply_nag(model, backend="torch")
    same = toy.run(model, toy.same_negative(kw))  # negative == positive: the stock output, up to rounding
    for a, b in zip(same, stock):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    remove_nag(model)
    assert kinds == {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    assert {type(b.cross_attn.processor) for b in model.blocks} == {WanAnimate2CrossAttnProcessor}
    assert equal(toy.run(model, toy.plain(kw)), stock)
    assert not hasattr(model, "_nag_state") and not model._forward_pre_hooks and not model._forward_hooks


def test_the_reference_pass_stays_plain():
    """``kv_cache_mode="extract"`` fills the KV cache from the reference (the driving video): conditioning, never
    guided. With NAG applied it is the stock pass, and given the NAG rows too it runs plain on the positive rows."""
    model = toy.transformer().double()
    positive = toy.text(2, 11)
    stock = toy.reference_pass(model, 2, texts=positive)
    apply_nag(model, backend="torch")
    for texts in (positive, [*positive, *toy.text(2, 99)]):
        cache = toy.reference_pass(model, 2, texts=texts)
        for index in range(model.config.num_layers):
            assert torch.equal(cache.get(index).key, stock.get(index).key)
            assert torch.equal(cache.get(index).value, stock.get(index).value)


def test_fused_projections():
    model = toy.transformer().double()
    kw = toy.inputs(model)
    want = reference.forward(model, **kw, **DEFAULTS)
    model.fuse_qkv_projections()
    assert all(b.cross_attn.fused_projections for b in model.blocks)
    apply_nag(model, backend="torch")
    close(toy.run(model, kw), want)


def test_autograd_matches_the_definition_and_finite_differences():
    """torch 2.13 runs flex attention's backward on CUDA only: the stock generation pass refuses gradients on the CPU
    (below), so the guided cross-attention is differentiated here on its own, as the model calls it (the record set
    by the model's pre-hook), against the definition and finite differences."""
    from nag_kernels.integrations import call_state
    from nag_kernels.integrations.config import NAGConfig
    from nag_kernels.integrations.guided import NAGForward

    model = apply_nag(toy.transformer().double(), backend="torch")
    attn = model.blocks[0].cross_attn
    g = torch.Generator().manual_seed(3)
    x, image = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, 12, 24), (2, 5, 24)))
    text = torch.randn(4, toy.TEXT_LEN, 24, generator=g, dtype=torch.float64)
    probe = torch.randn(2, 12, 24, generator=g, dtype=torch.float64)
    record = NAGForward.of(2, toy.TEXT_LEN, NAGConfig(**DEFAULTS, backend="torch"))

    def loss(x, text, image):
        call_state.set_record(record)
        try:
            return (attn(x, encoder_hidden_states=text, encoder_hidden_states_image=image) * probe).sum()
        finally:
            call_state.set_record(None)

    def defined(x, text, image):
        out = torch.stack([reference.cross_attention(attn, x[b], [text[b], text[2 + b]], image[b], tuple(
            DEFAULTS.values())) for b in range(2)])
        return (out * probe).sum()

    inputs = [t.clone().requires_grad_(True) for t in (x, text, image)]
    loss(*inputs).backward()
    grads = [t.grad for t in inputs]
    assert all(grad.abs().max() > 0 for grad in grads) and attn.to_v.weight.grad.abs().max() > 0
    assert grads[1][2:].abs().max() > 0  # the NAG negative's rows get gradients
    expected = [t.clone().requires_grad_(True) for t in (x, text, image)]
    defined(*expected).backward()
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want.grad, rtol=1e-9, atol=1e-12)
    directions = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, text, image)]
    eps = 1e-6
    with torch.no_grad():
        up = loss(*(t + eps * d for t, d in zip((x, text, image), directions)))
        down = loss(*(t - eps * d for t, d in zip((x, text, image), directions)))
    torch.testing.assert_close(sum((gr * d).sum() for gr, d in zip(grads, directions)), (up - down) / (2 * eps),
                               rtol=1e-6, atol=1e-9)


def test_the_stock_generation_pass_takes_no_gradient_on_the_cpu():
    """Why the test above differentiates the cross-attention alone: torch 2.13's flex attention has no CPU backward,
    and the stock self-attention of the generation pass runs only on flex (diffusers' ``WanAnimate2AttnProcessor``),
    so the stock model refuses a forward that records gradients, with or without NAG."""
    model = toy.transformer().double()
    kw = toy.plain(toy.inputs(model))
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        model(**kw)


def test_bad_input_is_refused_naming_the_argument():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs(model, 2)
    text = kw["encoder_hidden_states"]
    cases = [
        ({"encoder_hidden_states": text[:3]}, ValueError, "encoder_hidden_states must have the batch of hidden_states"),
        ({"encoder_hidden_states": [*text[:3], text[3][:, :5]]}, ValueError,
         r"encoder_hidden_states\[3\] must be \[L, text_dim=32\]"),
        ({"encoder_hidden_states": [*text[:3], torch.zeros(9, 32, dtype=torch.float64)]}, ValueError,
         r"encoder_hidden_states\[3\] has 9 tokens, more than text_len=8"),
        ({"condition_latents": kw["condition_latents"][:1]}, ValueError, "condition_latents must have the batch"),
        ({"encoder_hidden_states_image": torch.cat([kw["encoder_hidden_states_image"]] * 2)}, ValueError,
         "encoder_hidden_states_image must have the batch of hidden_states"),
        ({"is_uncondtion": True}, ValueError, "is_uncondtion=True marks CFG's unconditional pass"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            toy.run(model, {**kw, **change})
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))  # nothing left behind


def test_a_parallel_config_is_refused_for_guided_calls_only():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    assert getattr(type(toy.transformer()), "_cp_plan", None) is None  # diffusers 0.42.1 has none for this model
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs(model)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    processor = model.blocks[1].cross_attn.processor
    processor._parallel_config = config  # what enable_parallelism sets on each processor
    assert processor.inner._parallel_config is config
    with pytest.raises(NotImplementedError, match=r"no context-parallel plan \(_cp_plan\) for WanAnimate2Transformer3D"):
        toy.run(model, kw)
    processor._parallel_config = None
    model._parallel_config = config  # and on the model
    with pytest.raises(NotImplementedError, match="NAG cannot guide this WanAnimate2Transformer3DModel"):
        toy.run(model, kw)
    model._parallel_config = None
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))
