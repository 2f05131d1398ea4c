"""NAG on HunyuanVideo 1.5 with the rest of diffusers: PEFT LoRA (on the layers NAG's patched forwards call, added
before or after apply_nag, adapters switched) with regional compilation and nag_scale changing between calls;
enable_model_cpu_offload through a pipeline call; group offloading before or after apply_nag; NAGGuidance as the
classic pipelines' ``guider``."""

from __future__ import annotations

import warnings

import hunyuanvideo15_toy as toy
import pytest
import torch
from nag_kernels.integrations import NAGGuidance, apply_nag, remove_nag
from test_hunyuanvideo15_pipeline import NEGATIVE, PROMPT, call_args, encoded, gen, reference_forward, run_reference
from test_hunyuanvideo15_transformer import expected, inputs, positive, run
from torch._dynamo.testing import CompileCounter

pytestmark = pytest.mark.usefixtures("single_thread")

# every layer one of NAG's patched forwards calls: the patch embedding's conv, the video AdaLN's linear, the final
# AdaLN's linear, the output projection; and attention projections of both streams
LORA_TARGETS = ["x_embedder.proj", "norm1.linear", "norm_out.linear", "proj_out", "attn.to_q", "attn.add_k_proj",
                "attn.add_v_proj"]


def lora(model, name):
    from peft import LoraConfig

    torch.manual_seed(len(name))
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS, init_lora_weights=False),
                      adapter_name=name)


@pytest.mark.parametrize("order", ["lora-then-nag", "nag-then-lora"])
def test_lora_with_regional_compilation_and_changing_settings(order):
    torch._dynamo.reset()
    model = toy.transformer(layers=3).double()
    kw = inputs()
    if order == "lora-then-nag":
        lora(model, "a")
        apply_nag(model, backend="torch")
    else:
        apply_nag(model, backend="torch")
        lora(model, "a")
    lora(model, "b")
    model.set_adapters(["a", "b"], weights=[1.0, 0.5])
    want = {s: expected(model, kw, nag_scale=s) for s in (5.0, 9.0, 3.0)}
    plain = expected(model, positive(kw))
    counter = CompileCounter()
    if order == "lora-then-nag":  # regional compilation once (dynamo's tracing is most of this test's time)
        model.compile_repeated_blocks(backend=counter, dynamic=False)
    torch.testing.assert_close(run(model, kw, nag_scale=5.0), want[5.0], rtol=0, atol=1e-10)
    frames = counter.frame_count
    for scale in (9.0, 3.0, 5.0):  # the settings are graph inputs: no new graph per value
        torch.testing.assert_close(run(model, kw, nag_scale=scale), want[scale], rtol=0, atol=1e-10)
    assert counter.frame_count == frames, f"{counter.frame_count - frames} graphs compiled for new nag_scale values"
    # one guided graph per compiled class (the dual-stream block, the patch embedding, the token refiner at 2B
    # rows), whatever the number of blocks
    assert frames <= (3 if order == "lora-then-nag" else 0), frames
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-10)  # a plain call too
    model.set_adapters("a")
    torch.testing.assert_close(run(model, kw), expected(model, kw), rtol=0, atol=1e-10)


def test_model_cpu_offload_through_a_pipeline_call():
    pipe = toy.pipeline(guidance_scale=3.0)
    kw = call_args(False, negative_prompt="trees")
    forward = reference_forward(pipe.transformer, encoded(pipe, NEGATIVE), encoded(pipe, "trees"))
    want = run_reference(pipe, forward, prompt=PROMPT, generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # accelerate re-wraps the top-level forward on every call
        out = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).frames
        torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = toy.transformer().double()
    kw = inputs()
    want, plain = expected(model, kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    steps = [offload, lambda: apply_nag(model, backend="torch")]
    for step in steps if order == "offload-then-nag" else steps[::-1]:
        step()
    torch.testing.assert_close(run(model, kw), want, rtol=0, atol=1e-10)
    remove_nag(model)
    assert torch.equal(run(model, positive(kw)), plain)


# -- NAGGuidance as the classic pipelines' guider --------------------------------------------------------------------


def _quiet_call(pipe, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(**kw).frames
    return out, [str(w.message) for w in caught if "NAG" in str(w.message)]


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_nag_guidance_is_accepted_as_the_guider_and_nag_acts_through_apply_nag(i2v):
    """HunyuanVideo15Pipeline and HunyuanVideo15ImageToVideoPipeline take a NAGGuidance as their guider (it is a
    ClassifierFreeGuidance): CFG as with the stock guider, and NAG as through apply_nag(pipe) and the call's NAG
    arguments with the stock guider (an enabled NAGGuidance's own settings drive every call:
    test_nag_guidance_settings_drive_a_classic_call)."""
    pipe = toy.pipeline(i2v, guidance_scale=3.0)
    kw = call_args(i2v, negative_prompt="trees")
    stock = pipe(prompt=PROMPT, generator=gen(), **kw).frames
    apply_nag(pipe, backend="torch")
    with_cfg_guider = pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **kw).frames
    pipe.register_modules(guider=NAGGuidance(guidance_scale=3.0, nag_scale=1.0))  # its NAG off
    out, _ = _quiet_call(pipe, prompt=PROMPT, generator=gen(), **kw)
    assert torch.equal(out, stock)  # CFG exactly as the stock guider
    scale = pipe._nag_config.scale  # apply_nag's, which the call's nag_scale brings back over the guider's 1
    out, _ = _quiet_call(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE, nag_scale=scale, generator=gen(), **kw)
    assert torch.equal(out, with_cfg_guider)
    pipe.register_modules(guider=NAGGuidance(guidance_scale=1.0))  # CFG off: the conditional pass only, guided
    out, _ = _quiet_call(pipe, prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **call_args(i2v))
    pipe.register_modules(guider=toy.guider(1.0))
    assert torch.equal(out, pipe(prompt=PROMPT, nag_negative_prompt=NEGATIVE, generator=gen(), **call_args(i2v)).frames)


def test_nag_guidance_settings_drive_a_classic_call():
    pipe = apply_nag(toy.pipeline(guidance_scale=3.0), backend="torch")
    kw = call_args(False, negative_prompt="trees")
    want = pipe(prompt=PROMPT, nag_negative_prompt="", nag_scale=9.0, generator=gen(), **kw).frames
    pipe.register_modules(guider=NAGGuidance(guidance_scale=3.0, nag_scale=9.0))
    out, messages = _quiet_call(pipe, prompt=PROMPT, generator=gen(), **kw)
    assert not messages
    assert torch.equal(out, want)
