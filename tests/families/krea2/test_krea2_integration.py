"""NAG on Krea 2 together with the rest of diffusers and torch: PEFT LoRA, model CPU offloading, regional compilation
with nag_scale / nag_tau / nag_alpha changing between calls, whole-model torch.compile, autograd (float64 gradients
against finite differences and the reference's), the meta device."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import krea2_reference
import krea2_toy
from krea2_toy import float64_throughout  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag
from test_krea2_pipeline import COMMON, encoded, gen, reference_forward, run_reference
from test_krea2_transformer import inputs, positive, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.usefixtures("float64_throughout")
def test_lora_adapter_applies_in_both_branches():
    from peft import LoraConfig

    model = krea2_toy.transformer().double()
    kw = inputs()
    before = reference(model, kw)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_gate", "to_out.0"],
                                 init_lora_weights=False))
    expected = reference(model, kw)  # the reference calls the (LoRA-wrapped) Linear modules
    assert (expected - before).abs().max() > 1e-5
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    with torch.no_grad():  # the LoRA scale travels in attention_kwargs as for the stock model
        scaled = model(**kw, attention_kwargs={"scale": 0.0}, return_dict=False)[0]
    torch.testing.assert_close(scaled, before, rtol=0, atol=1e-10)
    remove_nag(model)


@pytest.mark.usefixtures("float64_throughout")
def test_model_cpu_offload_keeps_nag_working():
    pipe = krea2_toy.pipeline()
    kw = dict(prompt="a cat", guidance_scale=4.5, **COMMON)
    expected = run_reference(pipe, reference_forward(pipe.transformer, encoded(pipe, "blurry"), encoded(pipe, "")[0]),
                             generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe(nag_negative_prompt="blurry", generator=gen(), **kw).images
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_regional_compilation_with_changing_settings():
    # A UI slider moves the settings between calls: the block class compiles once for the guided calls (the settings
    # are tensors, graph inputs) and once for plain calls, never once per block or per value; the outputs equal the
    # eager ones.
    torch._dynamo.reset()
    model = krea2_toy.transformer(layers=3).double()
    kw = inputs()
    settings = [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5), (11.0, 3.5, 0.125)]
    apply_nag(model, backend="torch")
    eager = [run(model, kw, nag_scale=s, nag_tau=t, nag_alpha=a) for s, t, a in settings]
    plain = run(model, positive(kw))
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    for (scale, tau, alpha), expected in zip(settings, eager):
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    guided = counter.frame_count
    assert guided == 1, f"{guided} graphs for the guided calls of 3 blocks"
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-12)
    assert counter.frame_count <= 2
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-12)


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    expected = run(model, kw)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the pre-hook, the record hand-off, the fusion
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-12)


STEP = 1e-3


@pytest.mark.usefixtures("float64_throughout")
def test_guided_forward_backpropagates_the_right_gradient():
    # L2: the L1 norm's kinks lie close enough to the test points to spoil central differences (the combine's L1
    # gradient is checked in the op tests); strong enough that the tau clamp acts on some tokens.
    nag = dict(nag_scale=8.0, nag_tau=1.5, nag_alpha=0.5)
    model = apply_nag(krea2_toy.transformer().double(), backend="torch", norm="l2", **nag)
    kw = inputs()
    x0 = kw.pop("hidden_states")
    weight = model.transformer_blocks[0].attn.to_k.weight  # its keys reach the loss through the LSEs too

    def forward(x):
        return model(hidden_states=x, **kw, return_dict=False)[0]

    x = x0.clone().requires_grad_()
    out = forward(x)
    assert out.requires_grad
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grad_x, grad_weight = torch.autograd.grad((out * w).sum(), (x, weight))

    # the reference's gradient (autograd through the 2B layout)
    x_ref = x0.clone().requires_grad_()
    ref = krea2_reference.krea2_forward(model, x_ref, norm="l2", **kw, **nag)
    ref_x, ref_weight = torch.autograd.grad((ref * w).sum(), (x_ref, weight))
    torch.testing.assert_close(grad_x, ref_x, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=0, atol=1e-10)

    # central finite differences along random directions, Richardson-extrapolated
    def central(d_x, d_weight, step):
        values = []
        for sign in (1, -1):
            weight.add_(sign * step * d_weight)
            values.append((forward(x0 + sign * step * d_x) * w).sum())
            weight.sub_(sign * step * d_weight)
        return (values[0] - values[1]) / (2 * step)

    g = torch.Generator().manual_seed(2)
    directions = [(torch.randn(x0.shape, generator=g, dtype=x0.dtype), torch.zeros_like(weight)) for _ in range(2)]
    directions += [(torch.zeros_like(x0), torch.randn(weight.shape, generator=g, dtype=weight.dtype))
                   for _ in range(2)]
    with torch.no_grad():
        numeric = torch.stack([(4 * central(dx, dw, STEP / 2) - central(dx, dw, STEP)) / 3 for dx, dw in directions])
    analytic = torch.stack([(grad_x * dx).sum() + (grad_weight * dw).sum() for dx, dw in directions])
    error = ((analytic - numeric).abs() / numeric.abs()).max().item()
    assert error < 1e-6, f"relative error {error:.2e}: analytic {analytic.tolist()}, finite differences {numeric.tolist()}"


def test_meta_device_guided_forward():
    model = krea2_toy.transformer().to("meta")
    kw = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    apply_nag(model)
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    assert out.device.type == "meta" and out.shape == kw["hidden_states"].shape


@pytest.mark.usefixtures("float64_throughout")
@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = krea2_toy.transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    def nag():
        apply_nag(model, backend="torch")

    for step in ((offload, nag) if order == "offload-then-nag" else (nag, offload)):
        step()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=0)
