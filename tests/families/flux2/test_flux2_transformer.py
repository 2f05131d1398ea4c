"""apply_nag on a Flux2Transformer2DModel: exact and fast mode against an independent float64 implementation of the
2B layout, plain calls and removal bit-identical, settings, batches, the fallback attention, KV-cache refusal."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

import flux2_reference
import flux2_toy
from nag_kernels.integrations import apply_nag, flux2, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

T, N = 8, 16  # text tokens, image tokens (a 4x4 latent grid)


def inputs(batch=2, guidance=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(N, 4)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(N) // 4, torch.arange(N) % 4
    txt_ids = torch.zeros(batch, T, 4)  # the pipelines' [B, T, 4] layout
    txt_ids[..., 3] = torch.arange(T)
    return dict(
        hidden_states=torch.randn(batch, N, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * batch, T, flux2_toy.TEXT_DIM, generator=g, dtype=dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 3.5, dtype=dtype) if guidance else None,
    )


def positive(kw):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: kw["hidden_states"].shape[0]]}


def run(model, kw, **jak):
    with torch.no_grad():
        return model(**kw, joint_attention_kwargs=jak or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return flux2_reference.flux2_forward(model, **kw, **nag)


@pytest.mark.parametrize("guidance", [False, True], ids=["klein", "dev-guidance"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_and_fast_equal_the_2b_layout(norm, guidance):
    model = flux2_toy.transformer(guidance=guidance, layers=2, single_layers=3).double()
    kw = inputs(guidance=guidance)
    plain = run(model, positive(kw))
    for mode in ("exact", "fast"):
        apply_nag(model, norm=norm, mode=mode, backend="torch")
        for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # the second one clamps
            out = run(model, kw, **call)
            expected = reference(model, kw, norm=norm, **call)
            assert out.shape == plain.shape
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
            assert (out - plain).abs().max() > 1e-5  # NAG acts
    remove_nag(model)


def test_default_mode_is_the_shared_image_stream_and_both_names_agree():
    model = flux2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    exact = run(model, kw)
    apply_nag(model, mode="fast", backend="torch")
    torch.testing.assert_close(run(model, kw), exact, rtol=0, atol=1e-12)


def test_negative_equal_to_positive_and_scale_one_reproduce_the_model():
    model = flux2_toy.transformer().double()
    kw = inputs()
    kw_same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:2]] * 2)}
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw_same), plain, rtol=0, atol=1e-12)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # NAG off: the negative rows are dropped
    assert torch.equal(run(model, positive(kw)), plain)  # a plain call is the stock call


def test_remove_nag_is_bit_identical_and_restores_the_processors():
    model = flux2_toy.transformer().double()
    kw = inputs()
    before = {name: p for name, p in model.attn_processors.items()}
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert all(type(p).__name__.startswith("NAGFlux2") for p in model.attn_processors.values())
    run(model, kw)
    remove_nag(model)
    assert all(model.attn_processors[name] is p for name, p in before.items())
    assert torch.equal(run(model, positive(kw)), plain)
    with pytest.raises(RuntimeError):  # a guided batch on the stock model fails in the stock code
        run(model, kw)


@pytest.mark.parametrize("batch", [1, 3])
def test_batches_and_two_dim_text_ids(batch):
    model = flux2_toy.transformer().double()
    kw = inputs(batch=batch, seed=batch)
    kw["txt_ids"] = kw["txt_ids"][0]  # [T, 4] is accepted too
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_nag_end_turns_nag_off_below_the_threshold():
    model = flux2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, nag_end=0.5, backend="torch")  # on while t >= 500
    late = {**kw, "timestep": torch.full((2,), 0.3, dtype=torch.float64)}
    assert torch.equal(run(model, late), run(model, positive(late)))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_non_torch_backend_runs_the_unsplit_branch_attention(monkeypatch):
    # A flash-attn / sage backend cannot run here; exact mode then attends per branch over [text_b ; image] through
    # the user's backend instead of the split image attention. Pretend the backend is not PyTorch's.
    model = flux2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    monkeypatch.setattr(flux2._Flux2Processor, "backend_is_torch", lambda self: False)
    calls = []
    original = flux2.combine
    monkeypatch.setattr(flux2, "combine", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    assert len(calls) == 2 + 2  # every block took the unsplit path


def test_auto_backend_float32():
    model = flux2_toy.transformer()
    kw = inputs(dtype=torch.float32)
    apply_nag(model)  # backend "auto" (the Triton interpreter on CPU)
    expected = reference(model.double(), {k: v.double() if v is not None and v.is_floating_point() else v
                                          for k, v in kw.items()})
    model.float()
    torch.testing.assert_close(run(model, kw).double(), expected, rtol=0, atol=1e-4)


def test_kv_cache_processors_and_arguments_are_refused_clearly():
    model = flux2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    with pytest.raises(NotImplementedError, match="kv_cache_mode"):
        run(model, {**kw, "kv_cache_mode": "extract", "num_ref_tokens": 0})
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    with pytest.raises(NotImplementedError, match="Flux2KVAttnProcessor.*Flux2KleinKVPipeline"):
        run(model, kw)
    run(model, positive(kw))  # plain calls still run


def test_guided_call_errors_name_the_argument():
    model = flux2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match="attention_mask"):
        run(model, kw, attention_mask=torch.ones(2, T + N, dtype=torch.bool))
