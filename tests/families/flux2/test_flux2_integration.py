"""NAG on FLUX.2 together with the rest of diffusers: PEFT LoRA, model CPU offloading, group offloading, regional
compilation with nag_scale / nag_tau / nag_alpha changing between calls; outputs against the float64 2B layout."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import flux2_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_flux2_pipeline import COMMON, gen, negative_embeds, reference_forward, run_reference
from test_flux2_transformer import inputs, positive, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lora_adapter_applies_in_both_branches():
    from peft import LoraConfig

    model = flux2_toy.transformer().double()
    kw = inputs()
    before = reference(model, kw)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v", "add_k_proj", "to_qkv_mlp_proj"],
                                 init_lora_weights=False))
    expected = reference(model, kw)  # the reference calls the (LoRA-wrapped) Linear modules
    assert (expected - before).abs().max() > 1e-5
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)


def test_fused_qkv_projections():
    model = flux2_toy.transformer().double()
    kw = inputs()
    expected = reference(model, kw)
    apply_nag(model, backend="torch")
    model.fuse_qkv_projections()  # the double blocks' to_qkv / to_added_qkv (diffusers' own projection helper)
    assert model.transformer_blocks[0].attn.fused_projections
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_model_cpu_offload_keeps_nag_working():
    pipe = flux2_toy.klein()
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry")),
                             prompt="a cat", generator=gen(), **COMMON)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe(prompt="a cat", nag_negative_prompt="blurry", generator=gen(), **COMMON).images
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = flux2_toy.transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    (offload if order == "offload-then-nag" else (lambda: apply_nag(model, backend="torch")))()
    (offload if order == "nag-then-offload" else (lambda: apply_nag(model, backend="torch")))()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=0)


def test_regional_compilation_with_changing_settings():
    # A UI slider moves the settings between calls: each block class compiles once, once more when the floats
    # become symbolic, never once per block or per value; the outputs stay exact.
    torch._dynamo.reset()
    model = flux2_toy.transformer(layers=2, single_layers=2).double()
    kw = inputs()
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5)]:
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        torch.testing.assert_close(out, reference(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha),
                                   rtol=0, atol=1e-10)
    assert counter.frame_count <= 4, f"{counter.frame_count} graphs for 2 block classes"
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), reference(model, positive(kw)), rtol=0, atol=1e-10)
