"""NAG on Chroma together with the rest of diffusers: PEFT LoRA (``set_adapters`` included), model CPU offloading
through a pipeline call, group offloading, regional compilation with nag_scale / nag_tau / nag_alpha changing between
calls; outputs against the float64 exact layout of ``chroma_toy.chroma_forward``."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaPipeline
from torch._dynamo.testing import CompileCounter

import chroma_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_chroma_pipeline import COMMON, negative, reference_forward
from test_chroma_transformer import inputs, positive, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")


def close(actual, expected, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_lora_adapters_apply_in_both_branches_and_set_adapters_switches_them():
    from peft import LoraConfig

    model = chroma_toy.transformer().double()
    kw = inputs("float")
    before = reference(model, kw)
    targets = ["to_q", "to_v", "add_k_proj", "to_add_out", "proj_mlp", "proj_out"]  # double and single blocks
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
    pipe = chroma_toy.pipeline(ChromaPipeline)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = {**COMMON, "guidance_scale": 1.0}
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, negative(pipe, "blurry dog"), None, calls)
    expected = pipe("a red cat", generator=gen(), **kw).images
    del pipe.transformer.forward
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe("a red cat", nag_negative_prompt="blurry dog", generator=gen(), **kw).images
        close(out, expected, atol=1e-9)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = chroma_toy.transformer().double()
    kw = inputs("float")
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
    # A UI slider moves the settings between calls: each block class compiles a bounded number of graphs (the NAG
    # scalars reach the processors as 0-dim tensors), never one per block or per value; the outputs stay exact.
    torch._dynamo.reset()
    model = chroma_toy.transformer(layers=2, single_layers=2).double()
    assert model._repeated_blocks == ["ChromaTransformerBlock", "ChromaSingleTransformerBlock"]
    kw = inputs("float")
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    settings = [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5), (11.0, 3.0, 0.75)]
    graphs = []
    for scale, tau, alpha in settings:
        call = dict(nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        close(run(model, kw, **call), reference(model, kw, **call))
        graphs.append(counter.frame_count)
    # one graph per block role (double blocks, the last double block handing both branches' text on, single blocks)
    # on the first call, none after it whatever the settings
    assert graphs == [graphs[0]] * len(settings) and graphs[0] <= 3, f"graphs after each call: {graphs}"
