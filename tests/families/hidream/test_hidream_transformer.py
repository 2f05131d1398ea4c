"""apply_nag on a HiDreamImageTransformer2DModel: the guided forward (exact and fast modes) against the independent
float64 definition (``hidream_reference``), batched CFG, non-square latents, off cases, removal, LoRA, regional
compilation, autograd, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor
from torch.utils.flop_counter import FlopCounterMode

import hidream_reference
import hidream_toy
from hidream_toy import positive, rows_of
from nag_kernels.integrations import apply_nag, call_state, remove_nag
from nag_kernels.integrations.families import hidream

pytestmark = pytest.mark.usefixtures("single_thread")

STRONG = {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}  # the tau clamp acts


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


def _processors(model):  # HiDream's model has no attn_processors property
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def reference(model, kw, **nag):
    with torch.no_grad():
        return hidream_reference.hidream_forward(model, **kw, **nag)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_guided_forward_equals_its_float64_definition(mode, norm):
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(2)
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-12)  # the reference is HiDream
    apply_nag(model, mode=mode, norm=norm, backend="torch")
    for call in ({}, STRONG):
        out = run(model, kw, **call)
        assert out.shape == plain.shape
        torch.testing.assert_close(out, reference(model, kw, mode=mode, norm=norm, **call), rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-3  # NAG changed the output
    # timesteps given with 2B rows: the same call
    kw2 = {**kw, "timesteps": torch.cat([kw["timesteps"]] * 2)}
    torch.testing.assert_close(run(model, kw2), run(model, kw), rtol=0, atol=0)


def test_exact_and_fast_differ_through_the_pooled_modulation_and_switch_modes():
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(1)
    exact = run(apply_nag(model, backend="torch"), kw, **STRONG)
    fast = run(apply_nag(model, mode="fast", backend="torch"), kw, **STRONG)
    assert (exact - fast).abs().max() > 1e-4  # the negative rows' image drifts in exact mode's single blocks
    torch.testing.assert_close(fast, reference(model, kw, mode="fast", **STRONG), rtol=0, atol=1e-10)
    torch.testing.assert_close(run(apply_nag(model, mode="exact", backend="torch"), kw, **STRONG), exact, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        apply_nag(model, mode="approx")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_batched_cfg_guides_only_the_conditional_rows(mode):
    # HiDreamImagePipeline batches CFG: latents [uncond; cond], text [uncond; cond; NAG negative of cond].
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(2, text_rows=3)
    stock_uncond = run(model, rows_of({**kw, "hidden_states": kw["hidden_states"][:1], "timesteps": kw["timesteps"][:1]},
                                      slice(0, 1)))
    apply_nag(model, mode=mode, backend="torch")
    out = run(model, kw, **STRONG)
    assert out.shape[0] == 2
    torch.testing.assert_close(out, reference(model, kw, mode=mode, **STRONG), rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:1], stock_uncond, rtol=0, atol=1e-12)  # the unconditional row: the stock forward
    off = run(model, kw, nag_scale=1.0)  # NAG off: the NAG row dropped, the stock batched CFG call
    remove_nag(model)
    assert torch.equal(off, run(model, rows_of(kw, slice(0, 2))))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_non_square_latents_padded_with_a_key_mask_and_patchified_inputs(mode):
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(2, height=16, width=8)  # 8x4 patches, padded to max_seq = 64 tokens with a key mask
    torch.testing.assert_close(run(model, positive(kw)), reference(model, positive(kw)), rtol=0, atol=1e-12)
    apply_nag(model, mode=mode, backend="torch")
    out = run(model, kw, **STRONG)
    torch.testing.assert_close(out, reference(model, kw, mode=mode, **STRONG), rtol=0, atol=1e-10)
    # the same latents given patchified, with their mask, ids and sizes at B rows
    tokens, masks, sizes, ids = model.patchify(kw["hidden_states"])
    patched = {**kw, "hidden_states": tokens, "hidden_states_masks": masks, "img_sizes": sizes, "img_ids": ids}
    torch.testing.assert_close(run(model, patched, **STRONG), out, rtol=0, atol=1e-12)


def test_rope_on_half_the_head_and_a_plain_feed_forward():
    # axes summing to half the head dim: the stock processor rotates the first half only; no routed experts.
    model = hidream_toy.transformer(axes_dims_rope=(4, 2, 2), num_routed_experts=0).double()
    kw = hidream_toy.inputs(1)
    torch.testing.assert_close(run(model, positive(kw)), reference(model, positive(kw)), rtol=0, atol=1e-12)
    for mode in ("exact", "fast"):
        apply_nag(model, mode=mode, backend="torch")
        torch.testing.assert_close(run(model, kw), reference(model, kw, mode=mode), rtol=0, atol=1e-10)


def test_off_cases_are_the_plain_forward_and_nag_end_is_a_noise_level_threshold():
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(2)
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)  # equal batches: the stock forward
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: every NAG row dropped (Llama's too)
    same = rows_of(kw, [0, 1, 0, 1])  # negative == positive
    for mode in ("exact", "fast"):
        apply_nag(model, mode=mode, backend="torch")
        torch.testing.assert_close(run(model, same, **STRONG), plain, rtol=0, atol=1e-12)
    apply_nag(model, mode="fast", nag_end=0.25, backend="torch")  # on while t >= 750
    for t, on in ((760.0, True), (750.0, True), (740.0, False)):
        kwt = {**kw, "timesteps": torch.full((2,), t, dtype=torch.float64)}
        with FlopCounterMode(display=False) as guided:
            out = run(model, kwt)
        with FlopCounterMode(display=False) as stock:
            expected = run(model, positive(kwt))
        if on:
            torch.testing.assert_close(out, reference(model, kwt, mode="fast"), rtol=0, atol=1e-10)
        else:
            assert torch.equal(out, expected)
        assert (guided.get_total_flops() > stock.get_total_flops()) == on


def test_llama_states_as_a_sequence_of_layers():
    # The model only indexes its Llama states by layer: a tuple of [rows, T, D] tensors works like the stacked tensor.
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(1)
    layers = {**kw, "encoder_hidden_states_llama3": tuple(kw["encoder_hidden_states_llama3"])}
    apply_nag(model, mode="fast", backend="torch")
    assert torch.equal(run(model, layers, **STRONG), run(model, kw, **STRONG))
    assert torch.equal(run(model, layers, nag_scale=1.0), run(model, positive(kw)))  # the NAG rows of each layer dropped


def test_remove_restores_the_model_exactly_and_apply_does_not_stack():
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(1)
    before = run(model, positive(kw))
    processors = _processors(model)
    apply_nag(model, backend="torch")
    apply_nag(model, nag_scale=3.0, mode="fast", backend="torch")  # updates, does not stack
    assert all(type(p.inner) is HiDreamAttnProcessor for p in _processors(model).values())
    hooks = [getattr(h, "__name__", "") for h in model._forward_pre_hooks.values()]
    assert hooks.count("pre_hook") == 1 and hooks.count("plain_llama_rows") == 1  # the guided one, the Llama rows'
    assert model.double_stream_blocks[0].block.forward.__func__ is hidream._double_forward
    torch.testing.assert_close(run(model, kw), reference(model, kw, mode="fast", nag_scale=3.0), rtol=0, atol=1e-10)
    remove_nag(model)
    assert _processors(model) == processors  # the very same processor objects
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "unpatchify"))
    assert not any(k.startswith("_nag") for m in model.modules() for k in m.__dict__)
    assert torch.equal(run(model, positive(kw)), before)


def test_lora_with_set_adapters():
    from peft import LoraConfig

    model = hidream_toy.transformer().double()
    targets = ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3"]
    model.add_adapter(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), "a")
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), "b")
    kw = hidream_toy.inputs(1)
    apply_nag(model, mode="fast", backend="torch")
    model.set_adapters(["a", "b"], [0.5, 1.0])
    lora = run(model, kw)
    torch.testing.assert_close(lora, reference(model, kw, mode="fast"), rtol=0, atol=1e-10)
    model.set_adapters(["b"], [1.0])
    other = run(model, kw, scale=0.5)  # the LoRA scale through the attention kwargs, with NAG's keys popped
    torch.testing.assert_close(other, run(model, kw, scale=0.5, nag_scale=5.0), rtol=0, atol=0)
    assert (other - lora).abs().max() > 1e-4


def test_regional_compilation_compiles_once_whatever_the_scale():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = hidream_toy.transformer(num_routed_experts=0).double()  # diffusers' MoE inference reads counts on the CPU
    kw = hidream_toy.inputs(1)
    plain = run(model, positive(kw))
    with pytest.raises(ValueError, match="_repeated_blocks"):  # diffusers declares no repeated blocks for HiDream
        model.compile_repeated_blocks(backend="eager")
    apply_nag(model, mode="fast", backend="torch")
    model._repeated_blocks = ["HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock"]
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, dynamic=False)
    scales = (5.0, 3.0, 11.0, 7.5)
    run(model, kw, nag_scale=scales[0])
    frames = counter.frame_count
    for scale in scales:
        torch.testing.assert_close(run(model, kw, nag_scale=scale), reference(model, kw, mode="fast", nag_scale=scale),
                                   rtol=0, atol=1e-10)
    assert counter.frame_count == frames, f"{counter.frame_count - frames} recompiles as nag_scale changed"
    assert frames <= 3  # double blocks (the last one hands on R rows) and single blocks
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-12)


def _rope_float64(xq, xk, freqs_cis):
    """diffusers' apply_rope without its float32 cast (the same rotation)."""
    def rotate(x):
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape)
    return rotate(xq), rotate(xk)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_autograd_matches_finite_differences(mode, monkeypatch):
    # diffusers rotates q/k in float32 (apply_rope casts, even for float64 models): a staircase at float32's resolution
    # that central differences cannot see through, so this test swaps in the same rotation in float64. Training mode:
    # diffusers' MoE inference path (moe_infer) runs under no_grad, its training path is differentiable.
    from diffusers.models.transformers import transformer_hidream_image

    monkeypatch.setattr(transformer_hidream_image, "apply_rope", _rope_float64)
    monkeypatch.setattr(hidream, "apply_rope", _rope_float64)
    model = hidream_toy.transformer().double().train()
    kw = hidream_toy.inputs(1)
    apply_nag(model, mode=mode, backend="torch")
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(kw["encoder_hidden_states_t5"].shape, generator=g, dtype=torch.float64)
    direction[:1] = 0  # move the NAG-negative row only
    weights = None

    def loss(t5):
        nonlocal weights
        out = model(**{**kw, "encoder_hidden_states_t5": t5}, attention_kwargs=STRONG, return_dict=False)[0]
        if weights is None:
            weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        return (out * weights).sum()

    t5 = kw["encoder_hidden_states_t5"].clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(t5), t5)
    eps = 1e-4  # truncation ~1e-9 relative here; smaller steps meet float64 roundoff in the loss
    with torch.no_grad():
        numeric = (loss(t5 + eps * direction) - loss(t5 - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert grad[1:].abs().max() > 0  # the gradient reaches the NAG-negative text
    torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-10)
    assert call_state.record() is None


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(hidream_toy.transformer().double(), backend="torch")
    kw = hidream_toy.inputs(2)
    llama = kw["encoder_hidden_states_llama3"]
    bad = [
        ({"encoder_hidden_states_llama3": llama[:, :2]}, ValueError, "encoder_hidden_states_llama3 must have 4 rows"),
        ({"encoder_hidden_states_llama3": llama[0]}, ValueError,
         r"must be a \[layers, rows, tokens, dim\] tensor \(or a sequence"),
        ({"encoder_hidden_states_llama3": (llama[0], llama[1, :, :4])}, ValueError, "or a sequence of per-layer"),
        ({"pooled_embeds": kw["pooled_embeds"][:2]}, ValueError, "pooled_embeds must have batch 4"),
        ({"pooled_embeds": None}, ValueError, "pooled_embeds must have batch 4"),
        ({"timesteps": torch.full((3,), 700.0, dtype=torch.float64)}, ValueError, "timesteps must have batch 2 or 4"),
        ({"encoder_hidden_states_t5": torch.cat([kw["encoder_hidden_states_t5"]] * 2)[:5]}, ValueError,
         "encoder_hidden_states_t5 must have the batch of hidden_states"),
    ]
    for change, error, message in bad:
        with pytest.raises(error, match=message):
            run(model, {**kw, **change})
    batched = hidream_toy.inputs(2, text_rows=3)  # batched CFG: the per-row checks in deliver
    with pytest.raises(ValueError, match="encoder_hidden_states_llama3 must have 3 rows"):
        run(model, {**batched, "encoder_hidden_states_llama3": batched["encoder_hidden_states_llama3"][:, :2]})
    with pytest.raises(ValueError, match="pooled_embeds must have batch 3"):
        run(model, {**batched, "pooled_embeds": batched["pooled_embeds"][:2]})
    assert call_state.record() is None
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)  # still usable


def test_parallel_config_and_foreign_processors_are_refused_clearly():
    model = hidream_toy.transformer().double()
    name = "double_stream_blocks.0.block.attn1"

    class Custom(HiDreamAttnProcessor):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    model.get_submodule(name).set_processor(Custom())
    apply_nag(model, backend="torch")
    kw = hidream_toy.inputs(1)
    with pytest.raises(RuntimeError, match=f"{name} uses Custom"):
        run(model, kw)
    remove_nag(model)
    model.get_submodule(name).set_processor(HiDreamAttnProcessor())
    apply_nag(model, backend="torch")
    model._parallel_config = object()  # what enable_parallelism leaves on a model
    with pytest.raises(NotImplementedError, match="no context-parallel plan"):
        run(model, kw)
    del model._parallel_config
    model.get_submodule(name).processor._parallel_config = object()  # a batched CFG call: refused by the processor
    with pytest.raises(NotImplementedError, match="no context-parallel plan"):
        run(model, hidream_toy.inputs(2, text_rows=3))
    model.get_submodule(name).processor._parallel_config = None
    assert call_state.record() is None
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_triton_backend_through_the_interpreter():
    model = hidream_toy.transformer().float()
    kw = hidream_toy.inputs(1, dtype=torch.float32)
    for mode in ("exact", "fast"):  # TRITON_INTERPRET=1 (conftest): the fused combine / merge kernels on the CPU
        expected = run(apply_nag(model, mode=mode, backend="torch"), kw, **STRONG)
        out = run(apply_nag(model, mode=mode, backend="auto"), kw, **STRONG)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_exact_mode_under_another_attention_backend_runs_the_unsplit_attention(monkeypatch):
    # A non-PyTorch backend (flash-attn, sage, ...) returns no LSE: exact mode then runs both branches' full attention
    # through it and combines. Forced here, since those backends need a GPU; dispatch runs PyTorch's SDPA.
    monkeypatch.setattr(hidream.NAGHiDreamAttnProcessor, "backend_is_torch", lambda self: False)
    model = hidream_toy.transformer().double()
    kw = hidream_toy.inputs(2, text_rows=3)  # with batched CFG's unguided row
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw, **STRONG), reference(model, kw, **STRONG), rtol=0, atol=1e-10)
