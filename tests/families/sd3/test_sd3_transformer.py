"""apply_nag on an SD3Transformer2DModel: the authors' computation in float64, the batched-CFG layout, plain calls,
removal, the authors' epsilon, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

import sd3_reference
import sd3_toy
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations import modulation

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, 16  # latent rows, text tokens


def inputs(batch=B, seed=0, timestep=500.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, sd3_toy.LATENT_CHANNELS, 16, 16, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2 * batch, T, sd3_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        pooled_projections=torch.randn(2 * batch, 2 * sd3_toy.CLIP_DIM, generator=g, dtype=torch.float64),
        timestep=torch.full((batch,), timestep, dtype=torch.float64),
    )


def positive(kw, batch=B):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch],
            "pooled_projections": kw["pooled_projections"][:batch]}


def run(model, kw, **jak):
    with torch.no_grad():
        return model(**kw, joint_attention_kwargs=jak or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return sd3_reference.sd3_forward(model, kw["hidden_states"], kw["encoder_hidden_states"],
                                         kw["pooled_projections"], kw["timestep"], **nag)


@pytest.mark.parametrize("variant", ["sd3.5", "sd3"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_mode_equals_the_authors_computation(variant, norm):
    model = sd3_toy.transformer(dual=(0,) if variant == "sd3.5" else (), qk_norm="rms_norm" if variant == "sd3.5"
                                else None).double()
    kw = inputs()
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-10)  # the reference is SD3
    apply_nag(model, norm=norm, backend="torch")
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # defaults; the tau clamp acting
        out = run(model, kw, **call)
        expected = reference(model, kw, norm=norm, **call)
        assert out.shape == plain.shape
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-4
    # the NAG negative's pooled rows are not used (the authors modulate the negative text with the positive pooled)
    other = {**kw, "pooled_projections": torch.cat([kw["pooled_projections"][:B], torch.zeros(B, 32).double()])}
    torch.testing.assert_close(run(model, other), run(model, kw), rtol=0, atol=0)


def test_batched_cfg_guides_only_the_conditional_rows():
    # The pipeline's CFG layout: latents [uncond; cond], text [uncond; cond; NAG negative of cond], pooled likewise.
    model = apply_nag(sd3_toy.transformer().double(), backend="torch")
    kw = inputs()
    g = torch.Generator().manual_seed(5)
    uncond_text = torch.randn(B, T, sd3_toy.TEXT_DIM, generator=g, dtype=torch.float64)
    uncond_pooled = torch.randn(B, 32, generator=g, dtype=torch.float64)
    batched = dict(
        hidden_states=torch.cat([kw["hidden_states"]] * 2),
        encoder_hidden_states=torch.cat([uncond_text, kw["encoder_hidden_states"]]),
        pooled_projections=torch.cat([uncond_pooled, kw["pooled_projections"]]),
        timestep=torch.cat([kw["timestep"]] * 2),
    )
    out = run(model, batched)
    torch.testing.assert_close(out, reference(model, batched), rtol=0, atol=1e-10)
    uncond = {**kw, "encoder_hidden_states": uncond_text, "pooled_projections": uncond_pooled}
    torch.testing.assert_close(out[:B], run(model, uncond), rtol=0, atol=1e-10)  # the unconditional rows: plain
    torch.testing.assert_close(out[B:], run(model, kw), rtol=0, atol=1e-10)  # the conditional rows: guided
    # nag_end past: a plain batched CFG call (the NAG rows of text and pooled dropped)
    off = run(model, {**batched, "timestep": torch.full((2 * B,), 100.0, dtype=torch.float64)}, nag_end=0.5)
    plain = {**batched, "encoder_hidden_states": batched["encoder_hidden_states"][: 2 * B],
             "pooled_projections": batched["pooled_projections"][: 2 * B],
             "timestep": torch.full((2 * B,), 100.0, dtype=torch.float64)}
    torch.testing.assert_close(off, reference(model, plain), rtol=0, atol=1e-10)


def test_off_cases_are_the_plain_forward():
    model = sd3_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)  # equal batches: plain
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: negative rows dropped
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)  # negative == positive


def test_the_authors_epsilon_changes_the_output_by_a_bounded_amount():
    # The authors add 1e-7 to both norms of the ratio |g| / |z+|; this project uses the factor form without it. The
    # factor min(1, tau |z+| / |g|) then moves by at most 1e-7 (1 + tau) / |z+| relative: far below 1e-6 here.
    model = sd3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    out = run(model, kw, nag_scale=12.0, nag_tau=1.5)
    authors = reference(model, kw, nag_scale=12.0, nag_tau=1.5, eps=1e-7)
    diff = (out - authors).abs().max()
    assert 0 < diff < 1e-6 * out.abs().max()


def test_remove_restores_the_model_exactly_and_apply_does_not_stack():
    model = sd3_toy.transformer().double()
    kw = inputs()
    before = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    apply_nag(model, nag_scale=3.0, backend="torch")
    assert all(type(p.inner) is JointAttnProcessor2_0 for p in model.attn_processors.values())
    assert len(model._forward_pre_hooks) == 1
    assert model.transformer_blocks[0].norm1_context.forward.__func__ is modulation.text_rows_forward
    torch.testing.assert_close(run(model, kw), reference(model, kw, nag_scale=3.0), rtol=0, atol=1e-10)
    remove_nag(model)
    assert model.attn_processors == processors
    assert not model._forward_pre_hooks
    assert not any("forward" in m.__dict__ or any(k.startswith("_nag") for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, positive(kw)), before)


def test_lora():
    from peft import LoraConfig

    model = sd3_toy.transformer().double()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "add_k_proj", "to_out.0"], init_lora_weights=False))
    kw = inputs()
    apply_nag(model, backend="torch")
    expected = reference(model, kw)
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    assert (expected - reference(model, kw, nag_scale=1.0 + 1e-9)).abs().max() > 1e-4  # NAG acts with the adapter


def test_regional_compilation_with_changing_nag_scale():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = sd3_toy.transformer(layers=8, dual=()).double()
    kw = inputs()
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    for block in model.transformer_blocks:  # SD3 has no _repeated_blocks: compile each block as regional compilation
        block.compile(backend=counter, dynamic=False)
    for scale in (5.0, 7.0):  # a changed scale recompiles each block kind once (then it is symbolic)
        torch.testing.assert_close(run(model, kw, nag_scale=scale), reference(model, kw, nag_scale=scale),
                                   rtol=0, atol=1e-10)
    # block kinds: joint / last (context_pre_only, no to_add_out): 2 graphs per scale, not one per block
    assert counter.frame_count <= 4, f"{counter.frame_count} graphs for 8 blocks"


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(sd3_toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="pooled_projections must have batch 4"):
        run(model, {**kw, "pooled_projections": kw["pooled_projections"][:3]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"]] * 2)[:5]})
    with pytest.raises(ValueError, match="mode"):
        apply_nag(sd3_toy.transformer(), mode="fast")
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
