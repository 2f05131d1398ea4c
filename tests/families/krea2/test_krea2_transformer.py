"""apply_nag on a Krea2Transformer2DModel: the guided forward against an independent float64 implementation of the 2B
layout (text masks, GQA, the sigmoid output gate), plain calls and removal bit-identical, settings, batches, the
fallback attention, bad input and the refusals (parallel config, gradient checkpointing, custom processors)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

import krea2_reference
import krea2_toy
from krea2_toy import float64_throughout  # noqa: F401  (fixture)
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.families import krea2

pytestmark = pytest.mark.usefixtures("single_thread", "float64_throughout")

T, SIDE = 6, 2  # text tokens; a 2x2 grid of image tokens
N = SIDE * SIDE


def position_ids(text_len=T):
    ids = torch.zeros(text_len + N, 3)  # text rows at the origin, image rows (0, h, w): the pipeline's layout
    ids[text_len:, 1], ids[text_len:, 2] = torch.arange(N) // SIDE, torch.arange(N) % SIDE
    return ids


def inputs(batch=2, seed=0, masked=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = None
    if masked:  # each row its own padding, in the middle as Krea 2's template pads ([prompt | PAD | suffix])
        mask = torch.ones(2 * batch, T, dtype=torch.bool)
        for row in range(2 * batch):
            mask[row, 1 + row % 3: 2 + row % 3 + row % 2] = False
    return dict(
        hidden_states=torch.randn(batch, N, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * batch, T, len(krea2_toy.LAYERS), krea2_toy.TEXT_HIDDEN, generator=g,
                                          dtype=dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        position_ids=position_ids(),
        encoder_attention_mask=mask,
    )


def positive(kw):
    batch = kw["hidden_states"].shape[0]
    mask = kw["encoder_attention_mask"]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch],
            "encoder_attention_mask": None if mask is None else mask[:batch]}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return krea2_reference.krea2_forward(model, **kw, **nag)


@pytest.mark.parametrize("kv_heads", [2, 4, 1], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_guided_forward_equals_the_2b_layout(norm, kv_heads):
    model = krea2_toy.transformer(num_key_value_heads=kv_heads).double()
    kw = inputs()
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-12)  # the reference is Krea 2
    for mode in ("exact", "fast"):
        apply_nag(model, norm=norm, mode=mode, backend="torch")
        for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # the second one clamps
            out = run(model, kw, **call)
            torch.testing.assert_close(out, reference(model, kw, norm=norm, **call), rtol=0, atol=1e-10)
            assert out.shape == plain.shape
            assert (out - plain).abs().max() > 1e-4  # NAG acts
    remove_nag(model)


def test_without_a_mask_and_with_batches_of_one_and_three():
    model = krea2_toy.transformer().double()
    apply_nag(model, backend="torch")
    for batch, masked in ((1, False), (3, True), (2, False)):
        kw = inputs(batch=batch, seed=batch, masked=masked)
        torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_negative_equal_to_positive_and_scale_one_reproduce_the_model():
    model = krea2_toy.transformer().double()
    kw = inputs()
    mask = kw["encoder_attention_mask"]
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:2]] * 2),
            "encoder_attention_mask": torch.cat([mask[:2]] * 2)}
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # NAG off: the negative rows are dropped
    assert torch.equal(run(model, positive(kw)), plain)  # a plain call is the stock call


def test_default_mode_and_both_names_agree():
    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    assert model._nag_state.config.mode == "exact"
    exact = run(model, kw)
    apply_nag(model, mode="fast", backend="torch")
    torch.testing.assert_close(run(model, kw), exact, rtol=0, atol=1e-12)


def test_remove_nag_is_bit_identical_and_restores_the_model():
    model = krea2_toy.transformer().double()
    kw = inputs()
    before = dict(model.attn_processors)
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert all(type(p).__name__ == "NAGKrea2AttnProcessor" for p in model.attn_processors.values())
    assert "forward" in model.text_fusion.__dict__
    run(model, kw)
    remove_nag(model)
    assert all(model.attn_processors[name] is p for name, p in before.items())
    assert "forward" not in model.text_fusion.__dict__ and "_nag_names" not in model.text_fusion.__dict__
    assert torch.equal(run(model, positive(kw)), plain)
    with pytest.raises(RuntimeError):  # a guided batch on the stock model fails in the stock code
        run(model, kw)


def test_nag_end_turns_nag_off_below_the_threshold():
    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, nag_end=0.5, backend="torch")  # on while t >= 500 (the model takes t / 1000)
    late = {**kw, "timestep": torch.full((2,), 0.3, dtype=torch.float64)}
    assert torch.equal(run(model, late), run(model, positive(late)))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)


def test_non_torch_backend_runs_the_unsplit_branch_attention(monkeypatch):
    # A flash-attn / sage backend cannot run here; exact mode then attends per branch over [text_b ; image] through
    # the user's backend instead of the split image attention. Pretend the backend is not PyTorch's.
    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    monkeypatch.setattr(krea2.NAGKrea2AttnProcessor, "backend_is_torch", lambda self: False)
    calls = []
    original = krea2.combine
    monkeypatch.setattr(krea2, "combine", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    assert len(calls) == 2  # every block took the unsplit path
    apply_nag(model, mode="fast", backend="torch")  # fast mode keeps the split attention
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    assert len(calls) == 2


def test_auto_backend_float32():
    model = krea2_toy.transformer()
    kw = inputs(dtype=torch.float32)
    apply_nag(model)  # backend "auto"
    expected = reference(model.double(), {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                          else v for k, v in kw.items()})
    model.to(torch.float32)  # (Module.float would keep float64 under float64_throughout)
    torch.testing.assert_close(run(model, kw).double(), expected, rtol=0, atol=1e-4)


def test_custom_processors_in_the_main_blocks_are_refused_not_in_the_text_fusion():
    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    model.text_fusion.refiner_blocks[0].attn.set_processor(Krea2AttnProcessor())  # text only: per branch anyway
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)
    model.transformer_blocks[1].attn.set_processor(Krea2AttnProcessor())
    with pytest.raises(RuntimeError, match="transformer_blocks.1.attn uses Krea2AttnProcessor, not NAG's processor"):
        run(model, kw)
    run(model, positive(kw))  # plain calls still run


def test_guided_call_errors_name_the_argument():
    model = krea2_toy.transformer().double()
    kw = inputs()
    mask = kw["encoder_attention_mask"]
    apply_nag(model, backend="torch")
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match="encoder_attention_mask must have batch 4"):
        run(model, {**kw, "encoder_attention_mask": mask[:2]})
    with pytest.raises(ValueError, match=r"encoder_attention_mask must have shape \(4, 6\)"):
        run(model, {**kw, "encoder_attention_mask": mask[:, :5]})
    with pytest.raises(TypeError, match="encoder_attention_mask must be a bool mask"):
        run(model, {**kw, "encoder_attention_mask": mask.long()})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2B, T, num_text_layers=3"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:, :, 0]})
    with pytest.raises(ValueError, match="timestep must have the batch of hidden_states"):
        run(model, {**kw, "timestep": torch.full((4,), 0.7, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"position_ids must have shape \(10, 3\)"):
        run(model, {**kw, "position_ids": position_ids(T - 1)})
    with pytest.raises(ValueError, match="nag_scale"):
        run(model, kw, nag_scale=0.5)


def test_parallel_config_and_gradient_checkpointing_are_refused():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = krea2_toy.transformer().double()
    kw = inputs()
    apply_nag(model, backend="torch")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model.transformer_blocks[1].attn.processor._parallel_config = config  # what enable_parallelism sets
    with pytest.raises(NotImplementedError, match="NAG cannot guide this call under diffusers' parallelism"):
        run(model, kw)
    model.transformer_blocks[1].attn.processor._parallel_config = None
    model._parallel_config = config
    with pytest.raises(NotImplementedError, match=r"no context-parallel plan \(_cp_plan\) for Krea2Transformer2DModel"):
        run(model, kw)
    model._parallel_config = None
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)

    model.enable_gradient_checkpointing()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(**kw, return_dict=False)
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=1e-10)  # no_grad: fine
