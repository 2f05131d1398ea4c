"""NAG on Kandinsky 6 with diffusers' features: LoRA (PEFT adapters on the guided projections) under regional
compilation with the settings changing between calls, whole-model torch.compile, group offloading before or after
apply_nag, model CPU offload through pipeline calls, and a decoded (float32, video and audio) pipeline call."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kandinsky6_reference as reference
import kandinsky6_toy as toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_kandinsky6_pipeline import COMMON, SETTINGS, expected, gen, negative, outputs
from test_kandinsky6_transformer import ATOL, DEFAULTS, close

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lora_and_regional_compilation_with_changing_settings():
    from peft import LoraConfig

    torch._dynamo.reset()
    model = toy.transformer(blocks=10).double()  # more fused blocks than dynamo's recompile limit (8)
    kw = toy.inputs()
    before = toy.run(model, toy.plain(kw))
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=[
        "cross_attention.to_key", "cross_attention.to_query", "attn.to_value", "self_attention.to_value"]))
    close(toy.run(model, toy.plain(kw)), reference.forward(model, **toy.plain(kw)))  # LoRA in both
    assert (toy.run(model, toy.plain(kw))[0] - before[0]).abs().max() > 1e-3
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    graphs = []
    for scale, tau, alpha in [(9.0, 3.5, 0.25), (5.0, 2.5, 0.25), (11.0, 1.5, 0.5)]:
        apply_nag(model, nag_scale=scale, nag_tau=tau, nag_alpha=alpha, backend="torch")
        close(toy.run(model, kw), reference.forward(model, **kw, scale=scale, tau=tau, alpha=alpha))
        graphs.append(counter.frame_count)
    # the text block class at two widths (video, audio) and the fused block class: no graph per block or per value
    assert graphs == [graphs[0]] * 3 and graphs[0] <= 3, f"graphs after each call: {graphs}"
    plain = toy.run(model, toy.plain(kw))
    close(plain, reference.forward(model, **toy.plain(kw)))
    remove_nag(model)
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), plain))


def test_lora_added_after_apply_nag_with_set_adapters():
    from peft import LoraConfig

    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    model.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["to_key", "to_value", "to_query"]),
                      adapter_name="style")
    model.set_adapters(["style"], weights=[0.5])  # diffusers finds the model class by name: no NAG subclass
    close(toy.run(model, kw), reference.forward(model, **kw, **DEFAULTS))
    remove_nag(model)
    assert model.active_adapters() == ["style"]
    close(toy.run(model, toy.plain(kw)), reference.forward(model, **toy.plain(kw)))


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the per-thread record hand-off traces too
    close(toy.run(compiled, kw), reference.forward(model, **kw, **DEFAULTS))


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = toy.transformer().double()
    kw = toy.inputs()
    want, plain = reference.forward(model, **kw, **DEFAULTS), toy.run(model, toy.plain(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    steps = [offload, lambda: apply_nag(model, backend="torch")]
    for step in steps if order == "offload-then-nag" else steps[::-1]:
        step()
    close(toy.run(model, kw), want)
    remove_nag(model)
    assert all(torch.equal(a, b) for a, b in zip(toy.run(model, toy.plain(kw)), plain))


def test_model_cpu_offload_through_pipeline_calls():
    pipe = toy.pipeline()
    kw = {**COMMON, "guidance_scale": 3.0}
    want, _ = expected(pipe, negative(pipe, ["dog"]), SETTINGS,
                       lambda: outputs(pipe("a red cat", generator=gen(), **kw)), cfg=True)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        out = outputs(pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw))
        for a, e in zip(out, want):
            torch.testing.assert_close(a, e, rtol=0, atol=ATOL)


def test_a_decoded_float32_call_with_video_and_audio():
    pipe = apply_nag(toy.pipeline(dtype=torch.float32))  # MMAudio decodes in float32 only
    kw = {**COMMON, "output_type": "np", "guidance_scale": 1.0}
    stock = pipe("a red cat", generator=gen(), **kw)
    out = pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw)
    assert out.frames.shape == stock.frames.shape == (1, toy.FRAMES, toy.SIZE, toy.SIZE, 3)
    assert out.audio.shape == stock.audio.shape and abs(out.audio - stock.audio).max() > 0
    assert abs(out.frames - stock.frames).max() > 0
