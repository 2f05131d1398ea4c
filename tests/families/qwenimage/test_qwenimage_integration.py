"""NAG on Qwen-Image together with the rest of diffusers: PEFT LoRA (``set_adapters`` included), model CPU offloading
through a pipeline call, group offloading, regional compilation with nag_scale / nag_tau / nag_alpha changing between
calls; outputs against the float64 computation of ``qwenimage_toy.qwen_forward``."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline
from torch._dynamo.testing import CompileCounter

import qwenimage_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_qwenimage_pipeline import COMMON, reference_forward, run_reference
from test_qwenimage_transformer import inputs, positive, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")


def close(actual, expected, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_lora_adapters_apply_in_both_branches_and_set_adapters_switches_them():
    from peft import LoraConfig

    model = qwenimage_toy.transformer().double()
    kw = inputs()
    before = reference(model, kw)
    targets = ["to_q", "to_v", "add_k_proj", "to_out.0", "to_add_out"]
    model.add_adapter(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), adapter_name="a")
    model.add_adapter(LoraConfig(r=2, target_modules=["to_k", "add_q_proj"], init_lora_weights=False),
                      adapter_name="b")
    apply_nag(model, backend="torch")
    outputs = []
    for names, weights in ((["a"], [1.0]), (["a", "b"], [0.5, 1.5]), (["b"], [1.0])):
        model.set_adapters(names, weights)
        expected = reference(model, kw)  # the reference calls the (LoRA-wrapped) Linear modules
        assert (expected - before).abs().max() > 1e-5
        out = run(model, kw)
        close(out, expected)
        outputs.append(out)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-5
    remove_nag(model)
    close(run(model, positive(kw)), reference(model, positive(kw)))


def test_model_cpu_offload_keeps_nag_working():
    pipe = qwenimage_toy.pipeline(QwenImagePipeline)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = {**COMMON, "true_cfg_scale": 1.0}
    forward = reference_forward(pipe.transformer, pipe.encode_prompt("blurry, ugly"))
    expected = run_reference(pipe, forward, "a red cat", generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe("a red cat", nag_negative_prompt="blurry, ugly", generator=gen(), **kw).images
        close(out, expected, atol=1e-9)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = qwenimage_toy.transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    (offload if order == "offload-then-nag" else (lambda: apply_nag(model, backend="torch")))()
    (offload if order == "nag-then-offload" else (lambda: apply_nag(model, backend="torch")))()
    close(run(model, kw), expected)
    remove_nag(model)
    close(run(model, positive(kw)), plain, atol=0)


def test_regional_compilation_with_changing_settings():
    # A UI slider moves the settings between calls: the block class compiles a bounded number of graphs (the NAG
    # scalars reach the processors as 0-dim tensors), never one per block or per value; the outputs stay exact.
    torch._dynamo.reset()
    model = qwenimage_toy.transformer(layers=3).double()
    assert model._repeated_blocks == ["QwenImageTransformerBlock"]
    kw = inputs()
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    settings = [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5), (11.0, 3.0, 0.75)]
    for scale, tau, alpha in settings:
        call = dict(nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        close(run(model, kw, **call), reference(model, kw, **call))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 3 blocks and {len(settings)} settings"
    # A plain call (B text rows, not 2B) after them: dynamo makes the text batch dynamic and, since block 0's text
    # input is a view and the others' are not, compiles that dynamic graph twice (the stock model does the same).
    close(run(model, positive(kw)), reference(model, positive(kw)))
    assert counter.frame_count <= 3, f"{counter.frame_count} graphs"
