"""apply_nag on an SDXL UNet2DConditionModel: the authors' computation in float64 (with and without batched CFG),
plain calls, removal and bad input.

The reference is the authors' NAG cross-attention written here (``AuthorsCrossAttention``: their processor tiles
the queries to every text row, runs one attention over all of them, combines the conditional rows with the
NAG-negative rows and keeps the unconditional rows), installed on an unpatched copy of the UNet.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import sdxl_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_wan_transformer import factor_combine

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, sdxl_toy.SEQ_LEN


class AuthorsCrossAttention:
    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        rows = hidden_states.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] == rows:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        guided = encoder_hidden_states.shape[0] - rows  # the NAG-negative rows: of the last `guided` latent rows
        query = attn.to_q(hidden_states)
        query = torch.cat([query, query[rows - guided:]])  # one query row per text row

        def split(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(query), split(attn.to_k(encoder_hidden_states)), split(attn.to_v(encoder_hidden_states)))
        out = out.transpose(1, 2).flatten(2, 3)
        combined = factor_combine(out[rows - guided: rows], out[rows:], self.scale, self.tau, self.alpha)
        out = torch.cat([out[: rows - guided], combined])
        return attn.to_out[0](out)


def authors_unet(unet, scale=5.0, tau=2.5, alpha=0.5):
    ref = copy.deepcopy(unet)
    for module in ref.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(AuthorsCrossAttention(scale, tau, alpha))
    return ref


def inputs(latent_rows=B, text_rows=2 * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(latent_rows, *sdxl_toy.LATENT, generator=g, dtype=torch.float64),
        timestep=torch.tensor(700.0, dtype=torch.float64),
        encoder_hidden_states=torch.randn(text_rows, T, sdxl_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(latent_rows, sdxl_toy.POOLED_DIM, generator=g, dtype=torch.float64),
            time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * latent_rows, dtype=torch.float64),
        ),
    )


def run(unet, kw, **cross_attention_kwargs):
    with torch.no_grad():
        return unet(**kw, cross_attention_kwargs=cross_attention_kwargs or None, return_dict=False)[0]


@pytest.mark.parametrize("cfg", [False, True], ids=["nag-only", "batched-cfg"])
def test_exact_equals_the_authors_computation(cfg):
    unet = sdxl_toy.unet().double()
    # batched CFG: latents [uncond B; cond B], text [uncond B; cond B; NAG-negative B]
    kw = inputs(2 * B, 3 * B) if cfg else inputs()
    rows = kw["sample"].shape[0]
    plain = run(unet, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:rows]})
    refs = {5.0: authors_unet(unet), 11.0: authors_unet(unet, 11.0, 1.5, 0.25)}
    apply_nag(unet, backend="torch")
    for scale, ref in refs.items():
        call = {} if scale == 5.0 else {"nag_scale": 11.0, "nag_tau": 1.5, "nag_alpha": 0.25}
        out = run(unet, kw, **call)
        assert out.shape == (rows, *sdxl_toy.LATENT)
        torch.testing.assert_close(out, run(ref, kw), rtol=0, atol=1e-10)
        assert (out - plain)[rows - B:].abs().min() > 0  # every conditional row changed
    if cfg:  # the unconditional rows are plain
        assert torch.equal(out[:B], plain[:B])


def test_off_cases_remove_and_negative_equal_to_positive():
    unet = sdxl_toy.unet().double()
    kw = inputs()
    positive = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:B]}
    plain = run(unet, positive)
    processors = unet.attn_processors
    apply_nag(unet, backend="torch")
    assert torch.equal(run(unet, positive), plain)
    assert torch.equal(run(unet, kw, nag_scale=1.0), plain)
    cfg = inputs(2 * B, 3 * B)
    cfg_plain = run(unet, {**cfg, "encoder_hidden_states": cfg["encoder_hidden_states"][: 2 * B]})
    assert torch.equal(run(unet, cfg, nag_scale=1.0), cfg_plain)  # batched CFG, NAG off: the rows dropped
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2)}
    torch.testing.assert_close(run(unet, same), plain, rtol=0, atol=1e-12)
    remove_nag(unet)
    assert unet.attn_processors == processors and not unet._forward_pre_hooks
    assert torch.equal(run(unet, positive), plain)


def test_bad_input_gets_clear_errors_and_the_unet_stays_usable():
    unet = apply_nag(sdxl_toy.unet().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states must have width cross_attention_dim=64, got 32"):
        run(unet, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :32]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of sample"):
        run(unet, {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"]] * 2)[:5]})
    name = next(n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention)
    unet.get_submodule(name).set_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match=f"{name} uses AttnProcessor2_0"):
        run(unet, kw)
    apply_nag(unet, backend="torch")
    ref = authors_unet(remove_nag(copy.deepcopy(unet)))
    torch.testing.assert_close(run(unet, kw), run(ref, kw), rtol=0, atol=1e-10)


def test_lora_adapters_apply_in_both_branches():
    from peft import LoraConfig

    unet = sdxl_toy.unet().double()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    kw = inputs(2 * B, 3 * B)
    expected = run(authors_unet(unet), kw)  # the copy carries the adapter
    apply_nag(unet, backend="torch")
    torch.testing.assert_close(run(unet, kw), expected, rtol=0, atol=1e-10)
    unet.set_adapters(["default"], [0.0])
    assert (run(unet, kw) - expected).abs().max() > 1e-5  # the adapter acts
