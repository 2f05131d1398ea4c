"""NAG on FLUX.3 together with the rest of diffusers and torch: PEFT LoRA (set_adapters, the LoRA scale), regional
compilation with nag_scale / nag_tau / nag_alpha changing between calls, whole-model torch.compile, autograd (float64
gradients against finite differences and the reference's), gradient checkpointing, group offloading, the meta
device."""

from __future__ import annotations

import flux3_reference
import flux3_toy
import pytest
import torch
from flux3_toy import float64_throughout  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag
from test_flux3_transformer import inputs, positive, reference, run
from torch._dynamo.testing import CompileCounter

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.usefixtures("float64_throughout")
def test_lora_adapter_applies_in_both_branches():
    from peft import LoraConfig

    model = flux3_toy.transformer().double()
    kw = inputs()
    before = reference(model, kw)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "linear_in"],
                                 init_lora_weights=False), adapter_name="style")
    expected = reference(model, kw)  # the reference calls the (LoRA-wrapped) Linear modules
    assert (expected - before).abs().max() > 1e-5
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    with torch.no_grad():  # the LoRA scale travels in attention_kwargs as for the stock model
        scaled = model(**kw, attention_kwargs={"scale": 0.0, "nag_scale": 5.0}, return_dict=False)[0]
    torch.testing.assert_close(scaled, before, rtol=0, atol=1e-10)
    model.set_adapters(["style"], weights=[0.0])  # diffusers finds the model class by name: NAG does not subclass
    torch.testing.assert_close(run(model, kw), before, rtol=0, atol=1e-10)
    remove_nag(model)


def test_regional_compilation_with_changing_settings():
    # A UI slider moves the settings between calls: each block class compiles once per role for the guided calls
    # (the settings are tensors, graph inputs) and once for plain calls, never once per block or per value; the
    # outputs equal the eager ones.
    torch._dynamo.reset()
    model = flux3_toy.transformer(layers=3, single_layers=3).double()
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
    # one graph per role: text mode blocks (per branch), image / reference mode blocks (stock), single-stream blocks
    assert guided == 3, f"{guided} graphs for the guided calls of 3 + 3 + 3 + 3 blocks"
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-12)
    assert counter.frame_count <= 2 * guided  # the plain calls: once per role again
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-12)


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    expected = run(model, kw)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the pre-hook, the record hand-off, the packing
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-12)


STEP = 1e-3


@pytest.mark.usefixtures("float64_throughout")
def test_guided_forward_backpropagates_the_right_gradient():
    # L2: the L1 norm's kinks lie close enough to the test points to spoil central differences (the combine's L1
    # gradient is checked in the op tests); strong enough that the tau clamp acts on some tokens.
    nag = dict(nag_scale=8.0, nag_tau=1.5, nag_alpha=0.5)
    model = apply_nag(flux3_toy.transformer().double(), backend="torch", norm="l2", **nag)
    kw = inputs()
    x0 = kw.pop("hidden_states")
    weight = model.single_transformer_blocks[0].attn.to_k.weight  # its keys reach the loss through the LSEs too

    def forward(x):
        return model(hidden_states=x, **kw, return_dict=False)[0]

    x = x0.clone().requires_grad_()
    out = forward(x)
    assert out.requires_grad
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grad_x, grad_weight = torch.autograd.grad((out * w).sum(), (x, weight))

    # the reference's gradient (autograd through the 2B layout)
    x_ref = x0.clone().requires_grad_()
    ref = flux3_reference.flux3_forward(model, x_ref, norm="l2", **kw, **nag)
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
    assert error < 1e-6, f"relative error {error:.2e}: analytic {analytic.tolist()}, differences {numeric.tolist()}"


@pytest.mark.usefixtures("float64_throughout")
def test_gradient_checkpointing_gives_the_plain_gradients():
    # The record travels per thread; the core binds it to each checkpointed block's call, so the recomputation in
    # backward is guided too.
    model = apply_nag(flux3_toy.transformer().double(), backend="torch", norm="l2")
    kw = inputs()
    x0 = kw.pop("hidden_states")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        x = x0.clone().requires_grad_()
        out = model(hidden_states=x, **kw, return_dict=False)[0]
        grads.append(torch.autograd.grad(out.square().sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    x = x0.clone().requires_grad_()
    ref = flux3_reference.flux3_forward(model, x, norm="l2", **kw)
    torch.testing.assert_close(torch.autograd.grad(ref.square().sum(), x)[0], grads[1], rtol=0, atol=1e-10)


def test_meta_device_guided_forward():
    model = flux3_toy.transformer().to("meta")
    kw = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    apply_nag(model)
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    assert out.device.type == "meta" and out.shape == kw["hidden_states"].shape


@pytest.mark.usefixtures("float64_throughout")
@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = flux3_toy.transformer().double()
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
