"""apply_nag(..., mode="fast") on Flux (docs/spec.md, "Fast mode"): against an independent fp64 definition, the split
attention, off cases, batches, removal, mode switching, pipelines, meta cost, torch.compile, fused QKV, the Triton merge."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

import flux_reference
import flux_toy
from nag_kernels.integrations import flux
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.flux import NAGForward
from nag_kernels.integrations.flux_fast import branch_join, image_attention
from test_flux_meta import _flops
from test_flux_pipeline import COMMON, EXTRA, gen, negative_embeds, reference_forward, run_reference
from test_flux_transformer import reference, run

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, N = 2, 8, 64  # image batch, text tokens, image tokens


def inputs(guidance=False, batch=B, seed=0, text_ids="zero"):
    """Transformer inputs with ``2 * batch`` text rows; ``text_ids="random"`` gives the text tokens their own RoPE
    positions (Flux's are all zero), so that applying the image tables to text rows (or vice versa) shows."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(N) // 8, torch.arange(N) % 8
    txt_ids = torch.zeros(T, 3) if text_ids == "zero" else torch.randint(0, 20, (T, 3), generator=g).float()
    f64 = dict(generator=g, dtype=torch.float64)
    return dict(
        hidden_states=torch.randn(batch, N, 16, **f64),
        encoder_hidden_states=torch.randn(2 * batch, T, flux_toy.TEXT_DIM, **f64),
        pooled_projections=torch.randn(2 * batch, flux_toy.TEXT_DIM, **f64),
        timestep=torch.full((batch,), 0.7, dtype=torch.float64),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 3.5, dtype=torch.float64) if guidance else None,
    )


def positive(kw):
    batch = kw["hidden_states"].shape[0]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch],
            "pooled_projections": kw["pooled_projections"][:batch]}


@pytest.mark.parametrize("guidance, norm, text_ids", [(False, "l1", "random"), (True, "l2", "zero")],
                         ids=["schnell-l1-text-rope", "guidance-l2"])
def test_fast_mode_equals_its_fp64_definition(guidance, norm, text_ids):
    model = flux_toy.transformer(guidance=guidance).double()
    kw = inputs(guidance, text_ids=text_ids)
    plain = run(model, positive(kw))
    exact = reference(model, kw, norm=norm)
    apply_nag(model, mode="fast", norm=norm, backend="torch")
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # the second one clamps at tau
        out = run(model, kw, **call)
        expected = reference(model, kw, norm=norm, mode="fast", **call)
        assert out.shape == (B, N, 16)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    out = run(model, kw)
    assert (out - plain).abs().max() > 1e-4  # NAG acts
    assert (out - exact).abs().max() > 1e-6  # and single blocks make it a different definition from exact mode


def test_rope_goes_to_the_right_tokens_in_the_split():
    # Text tokens with their own positions: the fast model matches the reference (which ropes [text ; image] as one
    # sequence) only if the text rows get the text tables and the image rows the image tables.
    model = apply_nag(flux_toy.transformer().double(), mode="fast", backend="torch")
    kw = inputs(text_ids="random", seed=3)
    out = run(model, kw)
    torch.testing.assert_close(out, reference(model, kw, mode="fast"), rtol=0, atol=1e-10)
    swapped = {**kw, "txt_ids": kw["txt_ids"].flip(0)}  # a different text rope changes the output
    assert (run(model, swapped) - out).abs().max() > 1e-6


def test_without_single_blocks_fast_mode_is_exact_mode():
    model = flux_toy.transformer(layers=3, single_layers=0).double()
    kw = inputs(text_ids="random")
    exact = run(apply_nag(model, mode="exact", backend="torch"), kw)
    fast = run(apply_nag(model, mode="fast", backend="torch"), kw)
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast, reference(model, kw), rtol=0, atol=1e-10)  # the authors' algorithm


@pytest.mark.parametrize("scale", [1.0, 7.0])
def test_split_image_attention_equals_one_attention_over_the_joined_keys(scale):
    g = torch.Generator().manual_seed(5)
    batch, n, t, h, d = 2, 37, 11, 3, 16
    f64 = dict(generator=g, dtype=torch.float64)
    q, k, v = (torch.randn(batch, n, h, d, **f64) * 2 for _ in range(3))
    tk, tv = torch.randn(2 * batch, t, h, d, **f64) * 2, torch.randn(2 * batch, t, h, d, **f64)
    nag = NAGForward(batch, t, scale, 2.5, 0.25, "l1", "torch", "fast")
    out = image_attention(q, k, v, tk, tv, nag)
    full = [flux_reference._attention(q, torch.cat([tk[i * batch:(i + 1) * batch], k], 1),
                                      torch.cat([tv[i * batch:(i + 1) * batch], v], 1)) for i in range(2)]
    expected = flux_reference.authors_combine(full[0], full[1], scale, 2.5, 0.25, "l1")
    assert out.shape == (batch, n, h * d)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    if scale == 1.0:  # NAG off: the merge alone is the positive branch's attention
        torch.testing.assert_close(out, full[0], rtol=0, atol=1e-12)


def test_branch_join_puts_each_branch_text_before_the_shared_image_rows():
    batch, t, n = 2, 3, 5
    text = torch.arange(2 * batch * t * 8, dtype=torch.float32).reshape(2 * batch, t, 2, 4)
    fused = -torch.arange(batch * n * 24, dtype=torch.float32).reshape(batch, n, 24)
    image = fused.chunk(3, dim=-1)[1].unflatten(-1, (2, 4))  # a strided view, as fused QKV projections give
    out = branch_join(text, image)
    assert out.shape == (2 * batch, t + n, 2, 4)
    for row in range(2 * batch):  # written out row by row: branch b's text rows, then the image of sample row % B
        torch.testing.assert_close(out[row], torch.cat([text[row], image[row % batch]]), rtol=0, atol=0)


def test_off_cases_and_a_neutral_negative_give_the_plain_forward():
    model = flux_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    apply_nag(model, mode="fast", backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)  # equal batches: plain
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: negative rows dropped
    # negative == positive: both branches equal, the combine returns the positive attention, which the split
    # computes exactly; so even the fast single blocks reproduce the plain forward
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "pooled_projections": torch.cat([kw["pooled_projections"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)


def test_each_sample_of_a_batch_equals_its_batch_one_run():
    model = apply_nag(flux_toy.transformer(guidance=True).double(), mode="fast", backend="torch")
    kw = inputs(guidance=True, batch=3, seed=7)
    out = run(model, kw)
    for i in range(3):
        one = {**kw, "hidden_states": kw["hidden_states"][i:i + 1], "timestep": kw["timestep"][i:i + 1],
               "guidance": kw["guidance"][i:i + 1],
               "encoder_hidden_states": kw["encoder_hidden_states"][[i, 3 + i]],
               "pooled_projections": kw["pooled_projections"][[i, 3 + i]]}
        torch.testing.assert_close(out[i:i + 1], run(model, one), rtol=0, atol=1e-12)


def test_mode_switching_and_removal():
    model = flux_toy.transformer().double()
    kw = inputs()
    before = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, mode="fast", backend="torch")
    fast = reference(model, kw, mode="fast")
    torch.testing.assert_close(run(model, kw), fast, rtol=0, atol=1e-10)
    apply_nag(model, mode="exact", backend="torch")  # switches, does not stack
    assert len(model._forward_pre_hooks) == 1
    assert all(b.forward.__func__ is flux._single_block_forward for b in model.single_transformer_blocks)
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    apply_nag(model, mode="fast", nag_scale=3.0, backend="torch")
    torch.testing.assert_close(run(model, kw), reference(model, kw, mode="fast", nag_scale=3.0), rtol=0, atol=1e-10)
    remove_nag(model)
    assert model.attn_processors == processors
    assert not model._forward_pre_hooks
    assert not any("forward" in m.__dict__ or any(k.startswith("_nag") for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, positive(kw)), before)


@pytest.mark.parametrize("cls", [FluxPipeline, FluxKontextPipeline], ids=lambda c: c.__name__)
def test_pipelines_run_fast_mode(cls):
    pipe = flux_toy.pipeline(cls)
    kw = {**COMMON, **EXTRA[cls], "guidance_scale": 0.0, "prompt": "a red cat"}
    plain = pipe(generator=gen(), **kw).images
    forward = reference_forward(pipe.transformer, negative_embeds(pipe, "blurry dog"), mode="fast")
    expected = run_reference(pipe, forward, generator=gen(), **kw)
    apply_nag(pipe, mode="fast", backend="torch", nag_end=1.0)  # Kontext's recommended nag_end is 0.25
    out = pipe(nag_negative_prompt="blurry dog", generator=gen(), **kw).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    remove_nag(pipe)
    assert torch.equal(pipe(generator=gen(), **kw).images, plain)


@pytest.mark.slow  # the full FLUX.1 on the meta device
def test_full_flux1_on_meta_fast_mode_costs_at_most_1_15x():
    # docs/spec.md, "Fast mode": about 1.13x the plain step at 1024x1024 (4096 image + 512 text tokens). Every attention
    # (dispatch_attention_fn for text queries, attention_with_lse for the image parts) is an aten SDPA op the
    # counter sees; the merge epilogue is elementwise (0 FLOPs in the counter's model, as for softmax).
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)  # the FLUX.1 config
    apply_nag(model, mode="fast")
    plain, fast = _flops(model, 1, 4096), _flops(model, 2, 4096)
    assert plain == pytest.approx(74.4, abs=0.05)
    assert fast == pytest.approx(84.14, abs=0.05)  # counted: 1.131x
    assert fast / plain <= 1.15
    # The saving is attention and the single blocks' linears: per single block the extra work is the text rows'
    # projections/MLP and the image->text_neg attention, 4 * 3072 * 4096 * 512 FLOPs of the latter per block.
    image_to_text = 4 * 3072 * 4096 * 512 / 1e12
    assert image_to_text * 38 < fast - plain


def test_torch_compile_and_fused_qkv():
    torch._dynamo.reset()
    model = flux_toy.transformer(layers=1, single_layers=2).double()
    kw = inputs(text_ids="random")
    apply_nag(model, mode="fast", backend="torch")
    expected = reference(model, kw, mode="fast")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-10)
    model.fuse_qkv_projections()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_triton_merge_through_the_interpreter():
    model = flux_toy.transformer(layers=1, single_layers=1).float()
    kw = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in inputs(batch=1).items()}
    expected = run(apply_nag(model, mode="fast", backend="torch"), kw)
    out = run(apply_nag(model, mode="fast", backend="auto"), kw)  # TRITON_INTERPRET=1: the fused merge on CPU
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_masks_get_a_clear_error_in_fast_mode():
    model = apply_nag(flux_toy.transformer().double(), mode="fast", backend="torch")
    kw = inputs()
    mask = torch.ones(B, 1, T + N, T + N, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode='fast' supports neither attention masks"):
        run(model, kw, attention_mask=mask)
    torch.testing.assert_close(run(model, kw), reference(model, kw, mode="fast"), rtol=0, atol=1e-10)  # still usable


def test_exact_mode_keeps_the_unsplit_attention_where_the_split_cannot_run():
    # With an attention mask exact mode attends per branch over [text_b ; image] through dispatch_attention_fn
    # (as it does for a context-parallel config or a non-PyTorch attention backend): same result, more FLOPs.
    model = apply_nag(flux_toy.transformer().double(), mode="exact", backend="torch")
    kw = inputs()
    mask = torch.ones(1, 1, T + N, T + N, dtype=torch.bool)
    with FlopCounterMode(display=False) as split:
        out = run(model, kw)
    with FlopCounterMode(display=False) as unsplit:
        masked = run(model, kw, attention_mask=mask)
    torch.testing.assert_close(masked, out, rtol=0, atol=1e-10)
    torch.testing.assert_close(out, reference(model, kw), rtol=0, atol=1e-10)
    assert unsplit.get_total_flops() > split.get_total_flops()
