"""apply_nag on a MiniMaxH3Transformer3DModel: the guided forward (the NAG negative's text as an extra segment of the
packed sequence, media rows shared) against an independent float64 implementation of the definition
(``minimax_h3_reference``), exact and fast mode, packed layouts in the pipeline's order and permuted, plain calls and
removal bit-identical, nag_scale=1 and negative == positive reproducing the stock model, nag_end, the fallback
attention, float32 with the auto backend, and clear errors (bad layout, parallel config)."""

from __future__ import annotations

import minimax_h3_reference
import minimax_h3_toy as toy
import pytest
import torch
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.families import minimax_h3

pytestmark = pytest.mark.usefixtures("single_thread")


def run(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)


def reference(model, kw, **nag):
    with torch.no_grad():
        return minimax_h3_reference.minimax_h3_forward(model, **kw, **nag)


def close(got, expected, atol=1e-10):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


def test_the_reference_is_the_stock_model_without_nag():
    model = toy.transformer()
    kw = toy.positive(toy.inputs(batch=2))
    close(run(model, kw), reference(model, kw), atol=1e-12)


@pytest.mark.parametrize("permute", [False, True], ids=["pipeline-order", "permuted-rows"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_exact_and_fast_equal_the_definition(norm, permute):
    model = toy.transformer()
    kw = toy.inputs(batch=2, permute=permute)
    plain = run(model, toy.positive(kw))
    for mode in ("exact", "fast"):
        apply_nag(model, norm=norm, mode=mode, backend="torch")
        for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):  # the second one clamps
            out = run(model, kw, **call)
            close(out, reference(model, kw, norm=norm, **call))
            assert out[0].shape == plain[0].shape and out[1].shape == plain[1].shape
            assert (out[0] - plain[0]).abs().max() > 1e-6  # NAG acts
    remove_nag(model)


@pytest.mark.parametrize("batch", [1, 3])
def test_batches_and_layout_sizes(batch):
    model = toy.transformer()
    kw = toy.inputs(batch=batch, text=3, condition=0, audio=2, video=6, seed=batch)
    apply_nag(model, backend="torch")
    close(run(model, kw), reference(model, kw))


def test_negative_equal_to_positive_and_scale_one_reproduce_the_model():
    model = toy.transformer()
    kw = toy.inputs(batch=2)
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:2]] * 2)}
    plain = run(model, toy.positive(kw))
    apply_nag(model, backend="torch")
    close(run(model, same), plain, atol=1e-12)
    for got, want in zip(run(model, kw, nag_scale=1.0), plain):  # NAG off: the negative rows are dropped
        assert torch.equal(got, want)
    for got, want in zip(run(model, toy.positive(kw)), plain):  # a plain call is the stock call
        assert torch.equal(got, want)


def test_remove_nag_is_bit_identical_and_restores_the_processors():
    model = toy.transformer()
    kw = toy.inputs()
    before = dict(model.attn_processors)
    plain = run(model, toy.positive(kw))
    apply_nag(model, backend="torch")
    assert all(type(p).__name__ == "NAGMiniMaxH3AttnProcessor" for p in model.attn_processors.values())
    run(model, kw)
    remove_nag(model)
    assert all(model.attn_processors[name] is p for name, p in before.items())
    for got, want in zip(run(model, toy.positive(kw)), plain):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError):  # a guided batch on the stock model fails in the stock code
        run(model, kw)


def test_nag_end_turns_nag_off_at_the_clean_end():
    # t = 1 is clean: the noise level is 1 - min(timestep) (the noisiest rows'), x 1000.
    model = toy.transformer()
    kw = toy.inputs()
    apply_nag(model, nag_end=0.5, backend="torch")  # on while 1000 * (1 - t) >= 500
    late = {**kw, "timestep": torch.tensor([0.6, 0.7, 0.9])}
    for got, want in zip(run(model, late), run(model, toy.positive(late))):
        assert torch.equal(got, want)
    close(run(model, kw), reference(model, kw))  # min t = 0.3: on


def test_non_torch_backend_runs_the_unsplit_branch_attention(monkeypatch):
    model = toy.transformer()
    kw = toy.inputs(batch=2)
    apply_nag(model, backend="torch")
    monkeypatch.setattr(minimax_h3.NAGMiniMaxH3AttnProcessor, "backend_is_torch", lambda self: False)
    calls = []
    original = minimax_h3.combine
    monkeypatch.setattr(minimax_h3, "combine", lambda *a, **k: calls.append(1) or original(*a, **k))
    close(run(model, kw), reference(model, kw))
    assert len(calls) == 2  # every block took the unsplit path


def test_auto_backend_float32():
    model = toy.transformer(dtype=torch.float32)
    kw = toy.inputs(dtype=torch.float32)
    apply_nag(model)  # backend "auto"
    got = run(model, kw)
    kw64 = {k: v.double() if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}
    expected = reference(model.double(), kw64)
    close([g.double() for g in got], expected, atol=1e-5)


def test_fit_text_cuts_and_pads_the_negative():
    x = torch.arange(12.0).reshape(1, 4, 3)
    assert torch.equal(minimax_h3.fit_text(x, 2), x[:, :2])
    assert torch.equal(minimax_h3.fit_text(x, 4), x)
    padded = minimax_h3.fit_text(x, 6)
    assert torch.equal(padded[:, :4], x) and torch.equal(padded[:, 4:], x[:, 3:].expand(1, 2, 3))


def test_guided_call_errors_name_the_argument():
    model = toy.transformer()
    kw = toy.inputs(batch=2)
    apply_nag(model, backend="torch")
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match="audio_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "audio_hidden_states": torch.cat([kw["audio_hidden_states"]] * 2)})
    with pytest.raises(ValueError, match="text_indices must have one entry per text token"):
        run(model, {**kw, "text_indices": kw["text_indices"][:-1]})
    with pytest.raises(ValueError, match="must cover the packed sequence"):
        run(model, {**kw, "audio_indices": kw["audio_indices"][:-1]})
    with pytest.raises(ValueError, match="token_tags must have shape"):
        run(model, {**kw, "token_tags": kw["token_tags"][:-1]})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2B, T, text_dim=12\]"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :-1]})
    with pytest.raises(ValueError, match="nag_scale"):
        run(model, kw, nag_scale=0.5)


def test_parallel_layouts_and_configs_that_nag_cannot_run_are_refused_at_the_guided_call():
    # Context parallelism itself runs (tests/parallel/test_parallel_minimax_h3.py); here, what is refused, in one process.
    import types

    from diffusers.models._modeling_parallel import (
        ContextParallelConfig,
        ParallelConfig,
    )

    model = toy.transformer()
    kw = toy.inputs()  # 5 text tokens, 15 media rows
    apply_nag(model, backend="torch")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model._parallel_config = config
    with pytest.raises(ValueError, match=r"degree 2 needs the text tokens \(encoder_hidden_states: 5\)"):
        run(model, kw)
    model._parallel_config = types.SimpleNamespace(tensor_parallel_config=object(), context_parallel_config=None)
    with pytest.raises(NotImplementedError, match="NAG cannot guide this MiniMaxH3Transformer3DModel under tensor"):
        run(model, kw)
    model._parallel_config = None
    model.transformer_blocks[1].attn.processor._parallel_config = config  # not through enable_parallelism
    with pytest.raises(RuntimeError, match="context-parallel degree of 2 but the model's parallel config has 1"):
        run(model, kw)
    model.transformer_blocks[1].attn.processor._parallel_config = None
    close(run(model, kw), reference(model, kw))
