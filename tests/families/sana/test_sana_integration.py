"""NAG on Sana together with the rest of diffusers: PEFT LoRA (``set_adapters`` included), model CPU offloading through
a pipeline call, group offloading in either order, regional compilation with nag_scale / nag_tau / nag_alpha changing
between calls; outputs against the float64 definition of ``sana_reference``."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaPipeline
from torch._dynamo.testing import CompileCounter

import sana_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_sana_pipeline import COMMON, RECOMMENDED, expected_images, negative
from test_sana_transformer import ATOL, inputs, plain_rows, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_lora_adapters_apply_in_both_branches_and_set_adapters_switches_them():
    from peft import LoraConfig

    model = sana_toy.transformer().double()
    kw = inputs()
    before = reference(model, kw)
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn1.to_v", "proj_out"]
    model.add_adapter(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), adapter_name="a")
    model.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_k", "linear_1"], init_lora_weights=False),
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
    close(run(model, plain_rows(kw, 2)), reference(model, plain_rows(kw, 2)))


def test_model_cpu_offload_keeps_nag_working():
    pipe = sana_toy.pipeline(SanaPipeline)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = {**COMMON, "guidance_scale": 3.0, "complex_human_instruction": None}
    expected, _ = expected_images(pipe, negative(pipe, "a red cat", "dog"), RECOMMENDED,
                                  lambda: pipe("a red cat", generator=gen(), **kw).images)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the second call runs after accelerate re-installed its hooks
        out = pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw).images
        close(out, expected, atol=1e-6)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = sana_toy.transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, plain_rows(kw, 2))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    (offload if order == "offload-then-nag" else (lambda: apply_nag(model, backend="torch")))()
    (offload if order == "nag-then-offload" else (lambda: apply_nag(model, backend="torch")))()
    close(run(model, kw), expected)
    remove_nag(model)
    close(run(model, plain_rows(kw, 2)), plain, atol=0)


def test_regional_compilation_with_changing_settings():
    """diffusers 0.42.1 declares no ``_repeated_blocks`` for Sana (``compile_repeated_blocks`` refuses the stock
    model); a user names the block class on the instance."""
    torch._dynamo.reset()
    model = sana_toy.transformer(layers=10).double()  # more blocks than dynamo's recompile limit (8)
    assert not type(model)._repeated_blocks
    model._repeated_blocks = ["SanaTransformerBlock"]
    kw = inputs()
    plain = run(model, plain_rows(kw, 2))
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    settings = [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5), (11.0, 3.0, 0.75)]
    graphs = []
    for scale, tau, alpha in settings:
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        close(out, reference(model, kw, scale=scale, tau=tau, alpha=alpha))
        graphs.append(counter.frame_count)
    # graphs for the block class on the first call only, whatever the settings: two, as the stock model compiles
    # (the first block's input, from the patch embedding, is not contiguous; the others' are)
    assert graphs == [2] * len(settings), f"graphs after each call: {graphs}"
    close(run(model, plain_rows(kw, 2)), plain, atol=1e-12)  # a plain call: the stock graphs
    assert counter.frame_count <= 4
    remove_nag(model)
    close(run(model, plain_rows(kw, 2)), plain, atol=1e-12)
