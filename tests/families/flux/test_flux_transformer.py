"""apply_nag on a FluxTransformer2DModel: the authors' 2B contract in exact mode, removal, coexistence, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

import flux_reference
import flux_toy
from nag_kernels.integrations import flux
from nag_kernels.integrations import NAGFluxTransformer2DModel, apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, N = 2, 8, 64  # image batch, text tokens, image tokens


def inputs(guidance=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(N) // 8, torch.arange(N) % 8
    return dict(
        hidden_states=torch.randn(B, N, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * B, T, flux_toy.TEXT_DIM, generator=g, dtype=dtype),
        pooled_projections=torch.randn(2 * B, flux_toy.TEXT_DIM, generator=g, dtype=dtype),
        timestep=torch.tensor([0.7, 0.7], dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(T, 3),
        guidance=torch.full((B,), 3.5, dtype=dtype) if guidance else None,
    )


def positive(kw):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:B], "pooled_projections": kw["pooled_projections"][:B]}


def run(model, kw, **jak):
    with torch.no_grad():
        return model(**kw, joint_attention_kwargs=jak or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return flux_reference.flux_forward(model, *(kw[k] for k in list(kw)), **nag)


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "guidance-embeds"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_mode_equals_authors_algorithm(norm, guidance):
    model = flux_toy.transformer(guidance=guidance, layers=3, single_layers=3).double()
    kw = inputs(guidance)
    plain = run(model, positive(kw))
    apply_nag(model, norm=norm, backend="torch")
    # Defaults from apply_nag, and per-call overrides strong enough that the tau clamp acts.
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):
        nag = {"nag_" + k[4:]: v for k, v in call.items()}
        out = run(model, kw, **call)
        expected = reference(model, kw, norm=norm, **nag)
        assert out.shape == (B, N, 16)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-4  # NAG changed the output
    # timestep/guidance given with 2B rows: same result
    kw2 = {**kw, "timestep": torch.cat([kw["timestep"]] * 2)}
    if guidance:
        kw2["guidance"] = torch.cat([kw["guidance"]] * 2)
    torch.testing.assert_close(run(model, kw2), run(model, kw), rtol=0, atol=0)


def test_norm_choice_matters_when_clamped():
    model = flux_toy.transformer().double()
    kw = inputs()
    outs = {norm: run(apply_nag(model, norm=norm, backend="torch"), kw, nag_scale=12.0, nag_tau=1.5) for norm in ("l1", "l2")}
    assert (outs["l1"] - outs["l2"]).abs().max() > 1e-5


def test_off_cases_are_the_plain_forward():
    model = flux_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)  # equal batches: plain
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: negative rows dropped
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "pooled_projections": torch.cat([kw["pooled_projections"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)  # negative == positive


def test_nag_end_is_a_noise_level_threshold_and_off_costs_a_plain_forward():
    from torch.utils.flop_counter import FlopCounterMode

    model = flux_toy.transformer().double()
    kw = inputs()
    apply_nag(model, nag_end=0.25, backend="torch")  # on while t >= 750
    for t, on in ((0.76, True), (0.75, True), (0.74, False), (0.2, False)):
        kwt = {**kw, "timestep": torch.tensor([t, t], dtype=torch.float64)}
        expected = reference(model, kwt) if on else reference(model, positive(kwt))
        with FlopCounterMode(display=False) as guided:
            out = run(model, kwt)
        with FlopCounterMode(display=False) as plain:
            run(model, positive(kwt))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        assert (guided.get_total_flops() > plain.get_total_flops()) == on
    with pytest.raises(ValueError, match="nag_end must be in"):
        run(model, kw, nag_end=1.5)


def test_remove_restores_the_model_exactly_and_apply_does_not_stack():
    model = flux_toy.transformer().double()
    kw = inputs()
    before = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    apply_nag(model, nag_scale=3.0, backend="torch")  # updates, does not stack
    assert all(type(p.inner) is FluxAttnProcessor for p in model.attn_processors.values())
    assert len(model._forward_pre_hooks) == 1
    assert model.single_transformer_blocks[0].forward.__func__ is flux._single_block_forward
    torch.testing.assert_close(run(model, kw), reference(model, kw, nag_scale=3.0), rtol=0, atol=1e-10)
    remove_nag(model)
    assert model.attn_processors == processors  # the very same processor objects
    assert not model._forward_pre_hooks
    assert not any("forward" in m.__dict__ or any(k.startswith("_nag") for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, positive(kw)), before)
    with pytest.raises(RuntimeError):
        run(model, kw)  # the stock model rejects the 2B layout again


def test_drop_in_transformer_class_keeps_lora_working():
    model = NAGFluxTransformer2DModel(**flux_toy.transformer().config).double()
    assert type(model).__name__ == "FluxTransformer2DModel"
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False), "a")
    model.set_adapters(["a"], [0.5])  # the authors' subclass fails here
    kw = inputs()
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_fused_qkv_and_attention_backend():
    model = flux_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    expected = reference(model, kw)
    model.fuse_qkv_projections()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    model.set_attention_backend("_native_math")
    assert all(p.inner._attention_backend.value == "_native_math" for p in model.attn_processors.values())
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)
    assert all(p._attention_backend.value == "_native_math" for p in model.attn_processors.values())


def test_torch_compile_of_the_patched_transformer():
    torch._dynamo.reset()
    model = flux_toy.transformer(layers=1, single_layers=2).double()
    kw = inputs()
    apply_nag(model, backend="torch")
    expected = reference(model, kw)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="already torch.compiled"):
        apply_nag(torch.compile(flux_toy.transformer()))


def test_triton_backend_through_the_interpreter():
    model = flux_toy.transformer().float()
    kw = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs().items()}
    expected = run(apply_nag(model, backend="torch"), kw)
    out = run(apply_nag(model, backend="auto"), kw)  # TRITON_INTERPRET=1: the fused kernel on CPU
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unwrappable_processor_refuses_guided_calls_only_and_unknown_model_gets_a_clear_error():
    model = flux_toy.transformer().double()
    name = "transformer_blocks.0.attn"
    ip = FluxIPAdapterAttnProcessor(32, 32).double()
    model.get_submodule(name).set_processor(ip)
    apply_nag(model, backend="torch")
    assert model.get_submodule(name).processor is ip  # left alone: NAG wraps the stock processors only
    with pytest.raises(RuntimeError, match=f"{name} uses FluxIPAdapterAttnProcessor"):
        run(model, inputs())
    remove_nag(model)
    assert model.get_submodule(name).processor is ip and not model._forward_pre_hooks
    with pytest.raises(TypeError, match="supported models: .*FluxTransformer2DModel"):
        apply_nag(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_nag(flux_toy.transformer(), mode="approx")
    with pytest.raises(ValueError, match="nag_end must be in"):
        apply_nag(flux_toy.transformer(), nag_end=-0.1)


def test_bad_batches_get_clear_errors():
    model = apply_nag(flux_toy.transformer().double(), backend="torch")
    kw = inputs()
    three = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"], kw["encoder_hidden_states"][:B]])}
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, three)
    with pytest.raises(ValueError, match="pooled_projections must have batch 4"):
        run(model, {**kw, "pooled_projections": kw["pooled_projections"][:B]})
    with pytest.raises(ValueError, match="timestep must have batch 2 or 4"):
        run(model, {**kw, "timestep": torch.full((3,), 0.5, dtype=torch.float64)})
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)  # still usable


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_composes_with_diffusers_group_offloading(order):
    # Group offloading wraps each block's forward with diffusers' HookRegistry: NAG's patched forwards must chain
    # with those wrappers in either order, and remove_nag must leave the offloaded model's plain forward intact.
    model = flux_toy.transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload(target=model):
        target.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    try:
        offload(flux_toy.transformer())
    except AttributeError:  # diffusers 0.35 asks torch.accelerator for a device, and a CPU-only machine has none
        pytest.skip("this diffusers' group offloading needs an accelerator")

    if order == "offload-then-nag":
        offload()
        apply_nag(model, backend="torch")
    else:
        apply_nag(model, backend="torch")
        offload()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=0)
