"""apply_nag on a ChromaTransformer2DModel: the shared image stream (the default) equals the authors' exact layout
(image tiled to 2B through the single blocks) in float64, with and without Chroma's 0/1 float text masks; plain calls unchanged; removal exact."""

from __future__ import annotations

import pytest
import torch

import chroma_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, N = 2, 8, 64


def inputs(mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(N) // 8, torch.arange(N) % 8
    kw = dict(
        hidden_states=torch.randn(B, N, 16, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2 * B, T, chroma_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        timestep=torch.full((B,), 0.7, dtype=torch.float64),
        img_ids=img_ids,
        txt_ids=torch.zeros(T, 3),
        attention_mask=None,
    )
    if mask is not None:  # each text row its own length (the pipelines keep one padding token), image keys all on
        text = torch.zeros(2 * B, T)
        for row, length in enumerate((8, 6, 3, 5)):
            text[row, :length] = 1
        full = torch.cat([text, torch.ones(2 * B, N)], dim=1)
        kw["attention_mask"] = full.to(torch.bool) if mask == "bool" else full.double()
    return kw


def positive(kw):
    mask = kw["attention_mask"]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:B],
            "attention_mask": None if mask is None else mask[:B]}


def run(model, kw, **jak):
    with torch.no_grad():
        return model(**kw, joint_attention_kwargs=jak or None, return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return chroma_toy.chroma_forward(model, **kw, **nag)


# (A bool mask with padding makes the stock model itself emit NaN: a padded text query has every key masked. Chroma's
# pipelines pass 0/1 float masks, which SDPA adds to the scores; the float case is what the pipelines run.)
@pytest.mark.parametrize("mask", [None, "float"])
def test_shared_image_stream_equals_the_authors_exact_layout(mask):
    model = chroma_toy.transformer().double()
    kw = inputs(mask)
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, reference(model, positive(kw)), rtol=0, atol=1e-10)
    apply_nag(model, backend="torch")
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):
        out = run(model, kw, **call)
        torch.testing.assert_close(out, reference(model, kw, **call), rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-4
    torch.testing.assert_close(run(model, kw, nag_scale=12.0), run(apply_nag(model, mode="exact", backend="torch"),
                               kw, nag_scale=12.0), rtol=0, atol=0)  # both names run the same computation


def test_unsplit_path_under_another_attention_backend():
    model = apply_nag(chroma_toy.transformer().double(), backend="torch")
    kw = inputs("float")
    expected = reference(model, kw)
    for processor in model.attn_processors.values():
        processor.backend_is_torch = lambda: False  # as under flash-attn / sage
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_off_cases_and_remove_are_the_plain_forward():
    model = chroma_toy.transformer().double()
    kw = inputs("float")
    plain = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "attention_mask": torch.cat([kw["attention_mask"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks
    assert not any("forward" in m.__dict__ or any(k.startswith("_nag") for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, positive(kw)), plain)
    with pytest.raises(ValueError, match="attention_mask must have batch 4"):
        run(apply_nag(model, backend="torch"), {**kw, "attention_mask": kw["attention_mask"][:B]})
