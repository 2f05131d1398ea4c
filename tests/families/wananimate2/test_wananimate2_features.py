"""NAG on Wan Animate 2 with diffusers' features: LoRA (PEFT adapters on the guided projections, before and after
apply_nag, set_adapters) under regional compilation with the settings changing between calls, group offloading
before or after apply_nag, and accelerate's model offload hook through modular pipeline calls.

Regional compilation runs with a counting backend (the graphs run eagerly; the flex self-attention then runs eagerly
too, as torch 2.13 compiles flex attention for the CPU only through Inductor): the stock block breaks its graph where
the RoPE reads the grid sizes (``.tolist()``), so ``fullgraph`` is off, and what is checked is that no graph is added
per block or per value of the settings. diffusers' automatic CPU offload of modular pipelines
(``ComponentsManager.enable_auto_cpu_offload``) asks the device for its free memory, which a CPU does not report on
torch 2.13: the model offload here is accelerate's ``cpu_offload_with_hook``, the hook classic pipelines use.
"""

from __future__ import annotations

import pytest
import torch
import wananimate2_reference as reference
import wananimate2_toy as toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_wananimate2_transformer import DEFAULTS, close, equal
from torch._dynamo.testing import CompileCounter

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

LORA = ["cross_attn.to_q", "cross_attn.to_k", "cross_attn.to_v", "cross_attn.add_k_proj", "self_attn.to_v"]


def test_lora_and_regional_compilation_with_changing_settings():
    from peft import LoraConfig

    torch._dynamo.reset()
    model = toy.transformer(layers=10).double()  # more blocks than dynamo's recompile limit (8)
    kw = toy.inputs(model)
    before = toy.run(model, toy.plain(kw))
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=LORA))
    close(toy.run(model, toy.plain(kw)), reference.forward(model, **toy.plain(kw)))  # LoRA in both
    assert (toy.run(model, toy.plain(kw))[0] - before[0]).abs().max() > 1e-3
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter)
    graphs = []
    for scale, tau, alpha in [(9.0, 3.5, 0.25), (5.0, 2.5, 0.25), (11.0, 1.5, 0.5)]:
        apply_nag(model, nag_scale=scale, nag_tau=tau, nag_alpha=alpha, backend="torch")
        close(toy.run(model, kw), reference.forward(model, **kw, scale=scale, tau=tau, alpha=alpha))
        graphs.append(counter.frame_count)
    assert graphs == [graphs[0]] * 3 and graphs[0] < 2 * len(model.blocks), f"graphs after each call: {graphs}"
    plain = toy.run(model, toy.plain(kw))
    close(plain, reference.forward(model, **toy.plain(kw)))
    remove_nag(model)
    assert equal(toy.run(model, toy.plain(kw)), plain)


def test_lora_added_after_apply_nag_with_set_adapters():
    from peft import LoraConfig

    model = apply_nag(toy.transformer().double(), backend="torch")
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]),
                      adapter_name="style")
    model.set_adapters(["style"], weights=[0.5])  # diffusers finds the model class by name: no NAG subclass
    kw = toy.inputs(model)
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))
    remove_nag(model)
    assert model.active_adapters() == ["style"]
    close(toy.run(model, toy.plain(kw)), reference.forward(model, **toy.plain(kw)))


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = toy.transformer().double()
    kw = toy.inputs(model)
    want, plain = reference.forward(model, **kw, **DEFAULTS), toy.run(model, toy.plain(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    steps = [offload, lambda: apply_nag(model, backend="torch")]
    for step in steps if order == "offload-then-nag" else steps[::-1]:
        step()
    close(toy.run(model, kw), want)
    remove_nag(model)
    assert equal(toy.run(model, toy.plain(kw)), plain)


def test_model_offload_hook_through_modular_pipeline_calls(monkeypatch):
    import test_wananimate2_modular as modular_tests
    from accelerate import cpu_offload_with_hook
    from diffusers.modular_pipelines import WanAnimate2DistilledBlocks

    pipe = modular_tests.pipeline(WanAnimate2DistilledBlocks)
    kw = dict(prompt=modular_tests.PROMPT, nag_negative_prompt=modular_tests.NEGATIVE)
    apply_nag(pipe, backend="torch")
    want = modular_tests.frames(pipe, **kw)
    _, hook = cpu_offload_with_hook(pipe.transformer, execution_device="cpu")
    try:
        for _ in range(2):
            assert equal(modular_tests.frames(pipe, **kw), want)
    finally:
        hook.remove()
