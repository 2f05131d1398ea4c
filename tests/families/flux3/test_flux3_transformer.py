"""apply_nag on a Flux3Transformer2DModel: the guided forward against an independent float64 implementation of the 2B
layout (with and without reference tokens, the flow map's target timestep), plain calls and removal bit-identical,
settings, batches, fused projections, the fallback attention, bad input and the refusals (parallel config, custom
processors)."""

from __future__ import annotations

import flux3_reference
import flux3_toy
import pytest
import torch
from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor
from flux3_toy import float64_throughout  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.families import flux3

pytestmark = pytest.mark.usefixtures("single_thread", "float64_throughout")

T, SIDE = 6, 2  # text tokens; a 2x2 grid of image tokens (and of reference tokens)
N = SIDE * SIDE


def image_ids(l_coord=0):
    """The pipeline's ``(t, h, w, l)`` ids: H/W scaled by 0.5 (its image RoPE scale), ``l`` 0 or -1, -2 for
    references."""
    h, w = torch.arange(N) // SIDE, torch.arange(N) % SIDE
    return torch.stack([torch.zeros(N), 0.5 * h, 0.5 * w, torch.full((N,), float(l_coord))], dim=1)


def text_ids(text_len=T):
    return torch.stack([torch.zeros(text_len)] * 3 + [torch.arange(text_len, dtype=torch.float32)], dim=1)


def inputs(batch=2, seed=0, cond=True, flow_map=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, N, flux3_toy.CHANNELS, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * batch, T, flux3_toy.JOINT, generator=g, dtype=dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        img_ids=image_ids(),
        txt_ids=text_ids(),
    )
    if cond:
        kw["image_cond_hidden_states"] = torch.randn(batch, N, flux3_toy.CHANNELS, generator=g, dtype=dtype)
        kw["image_cond_ids"] = image_ids(-1)
    if flow_map:
        kw["target_timestep"] = torch.full((batch,), 0.4, dtype=dtype)
    return kw


def positive(kw):
    batch = kw["hidden_states"].shape[0]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch]}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return flux3_reference.flux3_forward(model, **kw, **nag)


@pytest.mark.parametrize("cond", [True, False], ids=["reference-tokens", "text-to-image"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_guided_forward_equals_the_2b_layout(norm, cond):
    model = flux3_toy.transformer().double()
    kw = inputs(cond=cond)
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-12)  # the reference is FLUX.3
    for mode in ("exact", "fast"):
        apply_nag(model, norm=norm, mode=mode, backend="torch")
        for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # the second one clamps
            out = run(model, kw, **call)
            torch.testing.assert_close(out, reference(model, kw, norm=norm, **call), rtol=0, atol=1e-10)
            assert out.shape == plain.shape
            assert (out - plain).abs().max() > 1e-4  # NAG acts
    remove_nag(model)


def test_flow_map_and_batches_of_one_and_three():
    model = flux3_toy.transformer(flow_map=True).double()
    apply_nag(model, backend="torch")
    for batch, cond in ((1, False), (3, True), (2, True)):
        kw = inputs(batch=batch, seed=batch, cond=cond, flow_map=True)
        torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    kw = {**inputs(batch=3, flow_map=True), "timestep": torch.full((1,), 0.7, dtype=torch.float64)}  # one row: all
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_negative_equal_to_positive_and_scale_one_reproduce_the_model():
    model = flux3_toy.transformer().double()
    kw = inputs()
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:2]] * 2)}
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # NAG off: the negative rows are dropped
    assert torch.equal(run(model, positive(kw)), plain)  # a plain call is the stock call


def test_default_mode_and_both_names_agree():
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    assert model._nag_state.config.mode == "exact"
    assert (model._nag_state.config.scale, model._nag_state.config.tau, model._nag_state.config.alpha) == (5, 2.5, 0.25)
    exact = run(model, kw)
    apply_nag(model, mode="fast", backend="torch")
    torch.testing.assert_close(run(model, kw), exact, rtol=0, atol=1e-12)


def test_remove_nag_is_bit_identical_and_restores_the_model():
    model = flux3_toy.transformer().double()
    kw = inputs()
    before = dict(model.attn_processors)
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert all(type(p).__name__ == "NAGFlux3AttnProcessor" for p in model.attn_processors.values())
    bound = [m for m in model.modules() if flux3.GUIDED in m.__dict__]
    assert bound == [b.attn for b in (*model.txt_mode_blocks, *model.single_transformer_blocks)]
    run(model, kw)
    remove_nag(model)
    assert all(model.attn_processors[name] is p for name, p in before.items())
    assert not any(flux3.GUIDED in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, positive(kw)), plain)
    with pytest.raises(RuntimeError):  # a guided batch on the stock model fails in the stock code
        run(model, kw)


def test_nag_end_turns_nag_off_below_the_threshold():
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, nag_end=0.5, backend="torch")  # on while t >= 500 (the model takes t / 1000)
    late = {**kw, "timestep": torch.full((2,), 0.3, dtype=torch.float64)}
    assert torch.equal(run(model, late), run(model, positive(late)))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_fused_projections():
    model = flux3_toy.transformer().double()
    kw = inputs()
    expected = reference(model, kw)
    apply_nag(model, backend="torch")
    model.fuse_qkv_projections()
    assert model.single_transformer_blocks[0].attn.fused_projections
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_non_torch_backend_runs_the_unsplit_branch_attention(monkeypatch):
    # A flash-attn / sage backend cannot run here; exact mode then attends per branch over [text_b ; content] through
    # the user's backend instead of the split content attention. Pretend the backend is not PyTorch's.
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    monkeypatch.setattr(flux3.NAGFlux3AttnProcessor, "backend_is_torch", lambda self: False)
    calls = []
    original = flux3.combine
    monkeypatch.setattr(flux3, "combine", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    assert len(calls) == 2  # every single-stream block took the unsplit path
    apply_nag(model, mode="fast", backend="torch")  # fast mode keeps the split attention
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    assert len(calls) == 2


def test_auto_backend_float32():
    model = flux3_toy.transformer()
    kw = inputs(dtype=torch.float32)
    apply_nag(model)  # backend "auto"
    expected = reference(model.double(), {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                          else v for k, v in kw.items()})
    model.to(torch.float32)  # (Module.float would keep float64 under float64_throughout)
    torch.testing.assert_close(run(model, kw).double(), expected, rtol=0, atol=1e-4)


def test_custom_processors_in_the_guided_blocks_are_refused_not_in_the_image_mode_blocks():
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    model.mode_blocks["image"][0].attn.set_processor(Flux3AttnProcessor())  # the shared image stream: stock anyway
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    model.txt_mode_blocks[1].attn.set_processor(Flux3AttnProcessor())
    with pytest.raises(RuntimeError, match="txt_mode_blocks.1.attn uses Flux3AttnProcessor, not NAG's processor"):
        run(model, kw)
    apply_nag(model, backend="torch")  # wraps the stock processors set since
    model.single_transformer_blocks[0].attn.set_processor(Flux3AttnProcessor())
    with pytest.raises(RuntimeError, match="single_transformer_blocks.0.attn uses Flux3AttnProcessor"):
        run(model, kw)
    run(model, positive(kw))  # plain calls still run


def test_guided_call_errors_name_the_argument():
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2B, T, joint_attention_dim=128\]"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :64]})
    with pytest.raises(ValueError, match="timestep must have the batch of hidden_states"):
        run(model, {**kw, "timestep": torch.full((4,), 0.7, dtype=torch.float64)})
    flow = flux3_toy.transformer(flow_map=True).double()
    apply_nag(flow, backend="torch")
    with pytest.raises(ValueError, match="target_timestep must have the batch of hidden_states"):
        run(flow, {**kw, "target_timestep": torch.full((4,), 0.3, dtype=torch.float64)})
    cond = kw["image_cond_hidden_states"]
    with pytest.raises(ValueError, match="image_cond_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "image_cond_hidden_states": torch.cat([cond, cond])})
    with pytest.raises(ValueError, match=r"txt_ids must have shape \(6, 4\)"):
        run(model, {**kw, "txt_ids": text_ids(T - 1)})
    with pytest.raises(ValueError, match=r"txt_ids must have shape \(6, 4\)"):
        run(model, {**kw, "txt_ids": text_ids()[None]})
    with pytest.raises(ValueError, match="nag_scale"):
        run(model, kw, nag_scale=0.5)


def test_parallel_config_is_refused():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    assert getattr(type(flux3_toy.transformer()), "_cp_plan", None) is None  # diffusers 0.42.1: no CP plan
    model = flux3_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model.single_transformer_blocks[1].attn.processor._parallel_config = config  # what enable_parallelism sets
    with pytest.raises(NotImplementedError, match="NAG cannot guide this call under diffusers' parallelism"):
        run(model, kw)
    model.single_transformer_blocks[1].attn.processor._parallel_config = None
    model._parallel_config = config
    with pytest.raises(NotImplementedError, match="no context-parallel plan .*for Flux3Transformer2DModel"):
        run(model, kw)
    run(model, positive(kw))  # plain calls are diffusers' business
    model._parallel_config = None
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_fit_window_pads_with_the_last_row_and_cuts():
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(flux3.fit_window(x, 3), x)
    assert torch.equal(flux3.fit_window(x, 2), x[:, :2])
    padded = flux3.fit_window(x, 5)
    assert padded.shape == (1, 5, 4) and torch.equal(padded[:, :3], x)
    assert torch.equal(padded[:, 3], x[:, 2]) and torch.equal(padded[:, 4], x[:, 2])
