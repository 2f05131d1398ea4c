"""apply_nag on an LTXVideoTransformer3DModel: the authors' pattern in float64 with a text mask per branch, batched
CFG, plain calls, removal and bad input.

The reference (``AuthorsLTXCrossAttention``, written here) is the authors' Wan/SDXL cross-attention pattern on
LTX's attention: one query row per text row, one masked attention over every text row, the conditional rows
combined with the NAG-negative rows. It runs on an unpatched copy of the model whose forward gets the text through
a reference hook that keeps the stock ``.view(batch, -1, C)`` from folding the extra text rows (the text is
projected per row and handed to the blocks directly).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_ltx import LTXAttention, LTXVideoAttnProcessor

import ltx_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_wan_transformer import factor_combine

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, ltx_toy.SEQ_LEN


class AuthorsLTXCrossAttention:
    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        rows, text_rows = hidden_states.shape[0], encoder_hidden_states.shape[0]
        guided = text_rows - rows
        query = attn.norm_q(attn.to_q(hidden_states))
        query = torch.cat([query, query[rows - guided:]])

        def split(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        mask = attention_mask[:, None] if attention_mask is not None else None  # [R, 1, 1, T] bias
        out = F.scaled_dot_product_attention(split(query), split(attn.norm_k(attn.to_k(encoder_hidden_states))),
                                             split(attn.to_v(encoder_hidden_states)), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3)
        if guided:
            combined = factor_combine(out[rows - guided: rows], out[rows:], self.scale, self.tau, self.alpha)
            out = torch.cat([out[: rows - guided], combined])
        return attn.to_out[0](out)


def authors_model(model, scale=9.0, tau=3.5, alpha=0.25):
    """An unpatched copy running the authors' cross-attention; its caption projection output keeps all text rows
    (a stand-in whose ``view(batch, -1, C)`` is the identity, so each block sees ``[R, T, C]``)."""
    ref = copy.deepcopy(model)
    for block in ref.transformer_blocks:
        block.attn2.set_processor(AuthorsLTXCrossAttention(scale, tau, alpha))

    class Rows(torch.Tensor):
        def view(self, *shape):
            return torch.Tensor(self)

    projection = ref.caption_projection
    original = projection.forward
    projection.forward = lambda x: original(x).as_subclass(Rows)
    return ref


def inputs(rows=B, text_rows=2 * B, seed=0, timestep=700.0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(text_rows, T)
    mask[torch.arange(text_rows), T - 1 - torch.arange(text_rows) % 3] = 0  # a different padding per text row
    frames, height, width = ltx_toy.LATENT
    return dict(
        hidden_states=torch.randn(rows, frames * height * width, ltx_toy.CHANNELS, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(text_rows, T, ltx_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        timestep=torch.full((rows,), timestep, dtype=torch.float64),
        encoder_attention_mask=mask,
        num_frames=frames, height=height, width=width,
    )


def plain_rows(kw, rows):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:rows],
            "encoder_attention_mask": kw["encoder_attention_mask"][:rows]}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


@pytest.mark.parametrize("cfg", [False, True], ids=["nag-only", "batched-cfg"])
def test_exact_equals_the_authors_pattern_with_a_mask_per_branch(cfg):
    model = ltx_toy.transformer().double()
    kw = inputs(2 * B, 3 * B) if cfg else inputs()
    rows = kw["hidden_states"].shape[0]
    plain = run(model, plain_rows(kw, rows))
    refs = {9.0: authors_model(model), 11.0: authors_model(model, 11.0, 1.5, 0.5)}
    apply_nag(model, backend="torch")
    for scale, ref in refs.items():
        call = {} if scale == 9.0 else {"nag_scale": 11.0, "nag_tau": 1.5, "nag_alpha": 0.5}
        out = run(model, kw, **call)
        torch.testing.assert_close(out, run(ref, kw), rtol=0, atol=1e-10)
        assert (out - plain)[rows - B:].abs().max() > 1e-3
    assert torch.equal(run(model, plain_rows(kw, rows)), plain)
    # the mask matters: all-ones masks give another result
    ones = {**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])}
    assert (run(model, ones) - out).abs().max() > 1e-4
    if cfg:
        assert torch.equal(out[:B], plain[:B])


def test_off_cases_and_remove():
    model = ltx_toy.transformer().double()
    kw = inputs()
    plain = run(model, plain_rows(kw, B))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "encoder_attention_mask": torch.cat([kw["encoder_attention_mask"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks
    assert not any(any(k.startswith("_nag") or k == "forward" for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, plain_rows(kw, B)), plain)


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(ltx_toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_attention_mask must have batch 4"):
        run(model, {**kw, "encoder_attention_mask": kw["encoder_attention_mask"][:B]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have width caption_channels=32, got 16"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :16]})
    model.transformer_blocks[1].attn2.set_processor(LTXVideoAttnProcessor())
    with pytest.raises(RuntimeError, match="transformer_blocks.1.attn2 uses LTXVideoAttnProcessor"):
        run(model, kw)
    apply_nag(model, backend="torch")
    ref = authors_model(remove_nag(copy.deepcopy(model)))
    torch.testing.assert_close(run(model, kw), run(ref, kw), rtol=0, atol=1e-10)
    assert all(isinstance(m, LTXAttention) for m in (b.attn2 for b in model.transformer_blocks))


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = ltx_toy.transformer().double()
    kw = inputs()
    expected = run(authors_model(model), kw)
    apply_nag(model, backend="torch")
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the caption projection's patch traces too
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-10)
