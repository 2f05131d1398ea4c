"""NAG on Z-Image together with the rest of diffusers: PEFT LoRA, model CPU offloading, regional compilation with
nag_scale / nag_tau / nag_alpha changing between calls; outputs against the float64 2B layout."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import zimage_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_zimage_pipeline import COMMON, gen, negative_embeds, reference_forward, run_reference
from test_zimage_transformer import close, reference, run, t_of

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lora_adapter_applies_in_both_branches():
    from peft import LoraConfig

    model = zimage_toy.transformer().double()
    x, caps, t = zimage_toy.latents(1), zimage_toy.captions([5, 40]), t_of(1)
    before = reference(model, x, t, caps)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v", "w1"], init_lora_weights=False))
    expected = reference(model, x, t, caps)
    assert (expected[0] - before[0]).abs().max() > 1e-5
    apply_nag(model, backend="torch")
    close(run(model, x, t, caps), expected)


def test_model_cpu_offload_keeps_nag_working():
    pipe = zimage_toy.pipeline()
    kw = dict(prompt="a cat", guidance_scale=0.0, **COMMON)
    expected = run_reference(pipe, reference_forward(pipe.transformer, negative_embeds(pipe, "blurry")),
                             generator=gen(), **kw)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        out = pipe(nag_negative_prompt="blurry", generator=gen(), **kw).images
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = zimage_toy.transformer().double()
    x, caps, t = zimage_toy.latents(1), zimage_toy.captions([5, 40]), t_of(1)
    expected, plain = reference(model, x, t, caps), run(model, x, t, caps[:1])
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    (offload if order == "offload-then-nag" else (lambda: apply_nag(model, backend="torch")))()
    (offload if order == "nag-then-offload" else (lambda: apply_nag(model, backend="torch")))()
    close(run(model, x, t, caps), expected)
    remove_nag(model)
    assert torch.equal(run(model, x, t, caps[:1])[0], plain[0])


def test_regional_compilation_with_changing_settings():
    torch._dynamo.reset()
    model = zimage_toy.transformer(layers=2).double()
    x, caps, t = zimage_toy.latents(1), zimage_toy.captions([5, 40]), t_of(1)
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5)]:
        close(run(model, x, t, caps, nag_scale=scale, nag_tau=tau, nag_alpha=alpha),
              reference(model, x, t, caps, nag_scale=scale, nag_tau=tau, nag_alpha=alpha))
    # noise refiner, context refiner (no modulation), joined layers: one graph each, once more for symbolic floats
    assert counter.frame_count <= 4, f"{counter.frame_count} graphs"
    remove_nag(model)
    close(run(model, x, t, caps[:1]), reference(model, x, t, caps[:1]))
