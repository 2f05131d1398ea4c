"""NAG on LTX-2 with diffusers' features: model CPU offload and group offloading, LoRA adapters (peft), regional
compilation (``compile_repeated_blocks``) with the NAG settings changing between calls, and the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import LTX2Pipeline
from torch._dynamo.testing import CompileCounter

import ltx2_toy
from ltx2_reference import reference_forward, reference_model
from nag_kernels.integrations import apply_nag, remove_nag
from test_ltx2_pipeline import CFG, call, close
from test_ltx2_transformer import inputs, plain_rows, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_model_cpu_offload_through_a_pipeline_call():
    pipe = ltx2_toy.pipeline(LTX2Pipeline, "2.3")
    apply_nag(pipe, backend="torch")
    expected = call(pipe, nag_negative_prompt="dog", **CFG)
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the offload hooks rewrite the top-level forward on every call
        close(call(pipe, nag_negative_prompt="dog", **CFG), expected, atol=0)
    plain = call(pipe, **CFG)
    remove_nag(pipe)
    close(call(pipe, **CFG), plain, atol=0)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = ltx2_toy.transformer("2.3").double()
    kw = inputs("2.3")
    expected, plain = reference_forward(reference_model(model), **kw), run(model, plain_rows(kw, 2))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    def nag():
        apply_nag(model, backend="torch")

    for step in ((offload, nag) if order == "offload-then-nag" else (nag, offload)):
        step()
    close(run(model, kw), expected)
    remove_nag(model)
    close(run(model, plain_rows(kw, 2)), plain, atol=0)


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_lora_and_regional_compilation_with_changing_settings(version):
    from peft import LoraConfig

    torch._dynamo.reset()
    model = ltx2_toy.transformer(version, layers=10).double()  # more blocks than dynamo's recompile limit (8)
    model.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_k", "audio_attn2.to_q", "attn1.to_v"],
                                 init_lora_weights=False), adapter_name="one")
    model.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_v", "audio_attn2.to_k"], init_lora_weights=False),
                      adapter_name="two")
    model.set_adapters(["one", "two"], weights=[1.0, 0.5])  # diffusers finds the model's class by name: unchanged
    kw = inputs(version)
    settings = [(9.0, 3.5, 0.25), (5.0, 2.5, 0.25), (11.0, 1.5, 0.5)]
    expected = [reference_forward(reference_model(model, *s), **kw) for s in settings]  # LoRA layers included
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    graphs = []
    for (scale, tau, alpha), want in zip(settings, expected):
        close(run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha), want)
        graphs.append(counter.frame_count)
    assert graphs == [graphs[0]] * 3 and graphs[0] <= 2, f"graphs after each call: {graphs}"


def test_meta_device_forward():
    """A full forward on the meta device (no data): the guided call runs with NAG on (the timestep has no value)."""
    with torch.device("meta"):
        model = ltx2_toy.transformer("2.3").double()
    apply_nag(model, backend="torch")
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inputs("2.3").items()}
    video, audio = run(model, kw)
    assert video.device.type == "meta" and video.shape == kw["hidden_states"].shape
    assert audio.shape == kw["audio_hidden_states"].shape
