"""NAG on MiniMax-H3 with diffusers' features: LoRA (PEFT adapters on the attention projections) under regional
compilation (``compile_repeated_blocks``) with the settings changing between calls, a LoRA added after apply_nag,
gradient checkpointing, and autograd through the guided forward against finite differences (float64)."""

from __future__ import annotations

import minimax_h3_reference
import minimax_h3_toy as toy
import pytest
import torch
from nag_kernels.integrations import apply_nag, remove_nag
from test_minimax_h3_transformer import close, reference, run
from torch._dynamo.testing import CompileCounter

pytestmark = pytest.mark.usefixtures("single_thread")
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def test_lora_and_regional_compilation_with_changing_settings():
    from peft import LoraConfig

    torch._dynamo.reset()
    model = toy.transformer(num_layers=10)  # more blocks than dynamo's recompile limit (8)
    kw = toy.inputs(batch=2)
    before = run(model, toy.positive(kw))
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=TARGETS))
    close(run(model, toy.positive(kw)), reference(model, toy.positive(kw)))  # LoRA in both
    assert (run(model, toy.positive(kw))[0] - before[0]).abs().max() > 1e-4
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    graphs = []
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (9.0, 3.5, 0.25), (12.0, 1.5, 0.5)]:
        apply_nag(model, nag_scale=scale, nag_tau=tau, nag_alpha=alpha, backend="torch")
        close(run(model, kw), reference(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha))
        graphs.append(counter.frame_count)
    # the refiner block and the transformer block classes: no graph per block or per value
    assert graphs == [graphs[0]] * 3 and graphs[0] <= 2, f"graphs after each call: {graphs}"
    plain = run(model, toy.positive(kw))
    close(plain, reference(model, toy.positive(kw)))
    remove_nag(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, toy.positive(kw)), plain))


def test_lora_added_after_apply_nag_with_a_scale():
    from peft import LoraConfig

    model = apply_nag(toy.transformer(), backend="torch")
    kw = toy.inputs()
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=TARGETS), adapter_name="style")
    model.set_adapters(["style"], weights=[0.5])
    close(run(model, kw), reference(model, kw))
    close(run(model, kw, scale=0.3, nag_scale=7.0), reference_with_scale(model, kw, 0.3, nag_scale=7.0))
    remove_nag(model)
    assert model.active_adapters() == ["style"]


def reference_with_scale(model, kw, scale, **nag):
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    scale_lora_layers(model, scale)
    try:
        return reference(model, kw, **nag)
    finally:
        unscale_lora_layers(model, scale)


def _loss(model, kw, weights):
    video, audio = model(**kw, return_dict=False)
    return (video * weights[0]).sum() + (audio * weights[1]).sum()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_autograd_matches_finite_differences(checkpointing):
    model = apply_nag(toy.transformer(), backend="torch", nag_scale=6.0, nag_tau=1.8)  # the clamp acts
    if checkpointing:
        model.enable_gradient_checkpointing()
    kw = toy.inputs(batch=1)
    g = torch.Generator().manual_seed(5)
    out = run(model, kw)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    names = ("hidden_states", "audio_hidden_states", "encoder_hidden_states")
    leaves = {name: kw[name].clone().requires_grad_(True) for name in names}
    param = model.transformer_blocks[1].attn.to_k.weight
    _loss(model, {**kw, **leaves}, weights).backward()
    grads = {name: leaves[name].grad for name in names}
    grads["to_k"] = param.grad.clone()
    eps = 1e-6
    with torch.no_grad():
        for name in names:
            direction = torch.randn(kw[name].shape, generator=g, dtype=torch.float64)
            plus = _loss(model, {**kw, name: kw[name] + eps * direction}, weights)
            minus = _loss(model, {**kw, name: kw[name] - eps * direction}, weights)
            numeric = (plus - minus) / (2 * eps)
            torch.testing.assert_close((grads[name] * direction).sum(), numeric, rtol=1e-6, atol=1e-8)
        direction = torch.randn(param.shape, generator=g, dtype=torch.float64)
        values = []
        for sign in (1, -1):
            param.add_(sign * eps * direction)
            values.append(_loss(model, kw, weights))
            param.sub_(sign * eps * direction)
        torch.testing.assert_close((grads["to_k"] * direction).sum(), (values[0] - values[1]) / (2 * eps),
                                   rtol=1e-6, atol=1e-8)
    assert grads["encoder_hidden_states"][1:].abs().max() > 0  # the NAG negative's rows get a gradient
    # and the gradient is the guided forward's: it equals the float64 definition's
    leaves = {name: kw[name].clone().requires_grad_(True) for name in names}
    model.zero_grad()
    expected = minimax_h3_reference.minimax_h3_forward(model, **{**kw, **leaves}, nag_scale=6.0, nag_tau=1.8)
    ((expected[0] * weights[0]).sum() + (expected[1] * weights[1]).sum()).backward()
    for name in names:
        torch.testing.assert_close(grads[name], leaves[name].grad, rtol=0, atol=1e-10)
    remove_nag(model)  # the token refiner's checkpointing function is diffusers' own again
    func = model.token_refiner.__dict__.get("_gradient_checkpointing_func")
    assert func is None or "_nag_checkpoint_original" not in getattr(func, "__dict__", {})
