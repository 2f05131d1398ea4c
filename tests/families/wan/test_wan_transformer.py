"""apply_nag on a WanTransformer3DModel: the authors' computation in float64, the 2B contract, removal, errors.

The reference is the authors' NAG Wan algorithm written here: an unpatched copy of the model whose cross-attention
modules run ``AuthorsWanCrossAttention`` (the video queries once, K/V of all 2B text rows, one attention per branch,
the combine, the I2V image context added after it, ``to_out``). Its combine is either the project's factor form or
the authors' guard (``nan_to_num(ratio, nan=10)`` and ``+1e-7``), whose difference is bounded below.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

import wan_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, 8  # videos, text tokens


def factor_combine(z_pos, z_neg, scale, tau, alpha):
    """docs/spec.md, "The combine" (L1)."""
    g = scale * z_pos - (scale - 1) * z_neg
    n_pos, n_g = z_pos.abs().sum(-1, keepdim=True), g.abs().sum(-1, keepdim=True)
    factor = torch.where(n_g > 0, torch.clamp(tau * n_pos / n_g, max=1.0), torch.ones_like(n_g))
    return alpha * factor * g + (1 - alpha) * z_pos


def authors_combine(z_pos, z_neg, scale, tau, alpha):
    """The authors' Wan combine: the ratio's NaN set to 10, and ``+1e-7`` in the clamped tokens' denominator."""
    g = z_pos * scale - z_neg * (scale - 1)
    n_pos, n_g = z_pos.abs().sum(-1, keepdim=True), g.abs().sum(-1, keepdim=True)
    ratio = torch.nan_to_num(n_g / n_pos, nan=10.0)
    g = torch.where(ratio > tau, g / (n_g + 1e-7) * n_pos * tau, g)
    return g * alpha + z_pos * (1 - alpha)


class AuthorsWanCrossAttention:
    """The authors' NAG cross-attention for Wan, with fixed settings (their processor's constructor arguments)."""

    def __init__(self, scale, tau, alpha, combine=factor_combine):
        self.scale, self.tau, self.alpha, self.combine = scale, tau, alpha, combine

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        batch = hidden_states.shape[0]
        guided = self.scale > 1 and encoder_hidden_states.shape[0] == 2 * batch
        image = None
        if attn.add_k_proj is not None:
            image = encoder_hidden_states[:batch, : encoder_hidden_states.shape[1] - 512]
            encoder_hidden_states = encoder_hidden_states[:, encoder_hidden_states.shape[1] - 512:]

        def split(x):  # [R, S, C] -> [R, H, S, D]
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        def attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3)

        query = split(attn.norm_q(attn.to_q(hidden_states)))
        key = split(attn.norm_k(attn.to_k(encoder_hidden_states)))
        value = split(attn.to_v(encoder_hidden_states))
        out = attention(query, key[:batch], value[:batch])
        if guided:
            negative = attention(query, key[batch:], value[batch:])
            out = self.combine(out, negative, self.scale, self.tau, self.alpha)
        if image is not None:
            out = out + attention(query, split(attn.norm_added_k(attn.add_k_proj(image))), split(attn.add_v_proj(image)))
        return attn.to_out[0](out)


def authors_model(model, scale=9.0, tau=3.5, alpha=0.25, combine=factor_combine):
    """An unpatched copy of ``model`` (take it before apply_nag) running the authors' cross-attention."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, WanAttention) and module.is_cross_attention:
            module.set_processor(AuthorsWanCrossAttention(scale, tau, alpha, combine))
    return ref


def inputs(batch=B, dtype=torch.float64, seed=0, timestep=700.0, image=False):
    g = torch.Generator().manual_seed(seed)
    text_len = 512 if image else T  # Wan's I2V attention takes the last 512 context tokens as text
    kw = dict(
        hidden_states=torch.randn(batch, *wan_toy.LATENT, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * batch, text_len, wan_toy.TEXT_DIM, generator=g, dtype=dtype),
        timestep=torch.full((batch,), timestep, dtype=dtype),
    )
    if image:
        kw["encoder_hidden_states_image"] = torch.randn(batch, 5, 20, generator=g, dtype=dtype)
    return kw


def authors_layout(kw):
    """The authors' pipeline passes the I2V image context with 2B rows too (their processor keeps the first B)."""
    image = kw.get("encoder_hidden_states_image")
    return kw if image is None else {**kw, "encoder_hidden_states_image": torch.cat([image, image])}


def positive(kw):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: kw["hidden_states"].shape[0]]}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


@pytest.mark.parametrize("config", [{}, {"image_dim": 20, "added_kv_proj_dim": 24, "in_channels": 36}],
                         ids=["t2v", "i2v"])
def test_exact_equals_the_authors_computation(config):
    model = wan_toy.transformer(**config).double()
    kw = inputs(image=bool(config))
    if config:
        kw["hidden_states"] = torch.randn(B, 36, *wan_toy.LATENT[1:], dtype=torch.float64)
    plain = run(model, positive({**kw, "encoder_hidden_states_image": kw.get("encoder_hidden_states_image")}))
    refs = {(9.0, 3.5, 0.25): authors_model(model), (12.0, 1.2, 0.5): authors_model(model, 12.0, 1.2, 0.5)}
    apply_nag(model, backend="torch")
    for (scale, tau, alpha), ref in refs.items():
        call = {} if scale == 9.0 else {"nag_scale": scale, "nag_tau": tau, "nag_alpha": alpha}
        out = run(model, kw, **call)
        assert out.shape == (B, 16, *wan_toy.LATENT[1:])
        torch.testing.assert_close(out, run(ref, authors_layout(kw)), rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-3  # NAG changed the output


def test_wan22_per_token_timesteps_and_nag_end_uses_the_noisiest_token():
    model = wan_toy.transformer().double()
    ref = authors_model(model)
    kw = inputs()
    tokens = 2 * 2 * 2  # latent frames x (4 / 2) x (4 / 2)
    per_token = torch.full((B, tokens), 700.0, dtype=torch.float64)
    per_token[:, :4] = 0.0  # TI2V image-to-video: the first frame's tokens are clean
    kw["timestep"] = per_token
    apply_nag(model, backend="torch", nag_end=0.25)  # on while t >= 750
    torch.testing.assert_close(run(model, kw), run(ref, positive(kw)), rtol=0, atol=1e-10)  # max 700: off
    per_token[:, 4:] = 800.0
    torch.testing.assert_close(run(model, kw), run(ref, kw), rtol=0, atol=1e-10)  # max 800: on


def test_authors_guard_differs_by_at_most_alpha_times_1e_7_per_token():
    # Per token, where the clamp acts: ours tau*|zp|/|g| * g, theirs tau*|zp|/(|g| + 1e-7) * g; the L1 norm of the
    # difference is alpha * tau*|zp| * 1e-7 / (|g| + 1e-7) < alpha * 1e-7 (the clamp acts only where |g| > tau*|zp|).
    # All-zero tokens: both give 0 (theirs via nan_to_num, ours via factor 1).
    g = torch.Generator().manual_seed(0)
    z_pos = torch.randn(4, 512, 64, generator=g, dtype=torch.float64) * torch.logspace(-6, 3, 512, dtype=torch.float64)[:, None]
    z_neg = torch.randn(4, 512, 64, generator=g, dtype=torch.float64) * 3
    z_pos[0, :3], z_neg[0, :2] = 0, 0  # all-zero tokens, and a zero positive with a non-zero negative
    for scale, tau, alpha in ((9.0, 3.5, 0.25), (11.0, 2.5, 0.5), (5.0, 1.0, 1.0)):
        ours, theirs = factor_combine(z_pos, z_neg, scale, tau, alpha), authors_combine(z_pos, z_neg, scale, tau, alpha)
        diff = (ours - theirs).abs().sum(-1)
        assert diff.max() <= alpha * 1e-7 and diff.max() > 0
        assert torch.equal(ours[0, :3], torch.zeros_like(ours[0, :3])) and torch.isfinite(theirs).all()
    # and the whole model, with a tau low enough that the clamp acts: the per-token bound, passed through to_out and
    # the later blocks, keeps the outputs within 1e-6 of each other
    model = wan_toy.transformer().double()
    kw = inputs()
    ours = run(authors_model(model, 9.0, 1.0, 0.5), kw)
    theirs = run(authors_model(model, 9.0, 1.0, 0.5, combine=authors_combine), kw)
    assert 0 < (ours - theirs).abs().max() < 1e-6


def test_off_cases_are_the_plain_forward():
    model = wan_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)  # equal batches: plain
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: the negative rows are dropped
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)  # negative == positive


def test_remove_restores_the_model_exactly_and_apply_does_not_stack():
    model = wan_toy.transformer().double()
    kw = inputs()
    before = run(model, positive(kw))
    processors = model.attn_processors
    ref = authors_model(model, scale=3.0)
    apply_nag(model, backend="torch")
    apply_nag(model, nag_scale=3.0, backend="torch")
    assert all(type(p.inner) is WanAttnProcessor for p in model.attn_processors.values())
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1  # guided.pre_hook, post_hook
    torch.testing.assert_close(run(model, kw), run(ref, kw), rtol=0, atol=1e-10)
    remove_nag(model)
    assert model.attn_processors == processors
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(any(k.startswith("_nag") for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, positive(kw)), before)
    with pytest.raises(RuntimeError):
        run(model, kw)  # the stock model rejects the 2B layout (the video batch differs from the text batch)


def test_backend_fused_projections_lora_and_batch():
    from peft import LoraConfig

    model = wan_toy.transformer().double()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    kw = inputs(batch=3, seed=1)
    ref = authors_model(model)
    apply_nag(model, backend="torch")
    expected = run(ref, kw)
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    for i in range(3):  # each row of the batch is its own batch-1 call
        one = {k: v[[i]] if k != "encoder_hidden_states" else v[[i, 3 + i]] for k, v in kw.items()}
        torch.testing.assert_close(run(model, one), expected[[i]], rtol=0, atol=1e-10)
    model.set_attention_backend("_native_math")
    assert all(p.inner._attention_backend.value == "_native_math" for p in model.attn_processors.values())
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    model.set_adapters(["default"], [0.0])  # the adapter acts
    assert (run(model, kw) - expected).abs().max() > 1e-5


def test_fused_kv_projections():
    model = wan_toy.transformer().double()
    kw = inputs()
    expected = run(authors_model(model), kw)
    apply_nag(model, backend="torch")
    model.fuse_qkv_projections()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(wan_toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have width text_dim=32, got 16"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :16]})
    name = "blocks.1.attn2"
    model.get_submodule(name).set_processor(WanAttnProcessor())
    with pytest.raises(RuntimeError, match=f"{name} uses WanAttnProcessor"):
        run(model, kw)
    apply_nag(model, backend="torch")  # re-wraps the stock processor set after apply_nag
    ref = authors_model(remove_nag(copy.deepcopy(model)))
    torch.testing.assert_close(run(model, kw), run(ref, kw), rtol=0, atol=1e-10)


def test_triton_backend_through_the_interpreter():
    model = wan_toy.transformer().float()
    kw = {k: v.float() for k, v in inputs().items()}
    expected = run(apply_nag(model, backend="torch"), kw)
    out = run(apply_nag(model, backend="auto"), kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_family_this_diffusers_cannot_load_is_named_in_the_error():
    # What families.load_all records when a family module's diffusers imports fail on an older release.
    from nag_kernels.integrations import registry

    class OldWan(torch.nn.Module):
        pass

    registry.register_unavailable("Wan 2.1 / 2.2", "cannot import name 'WanAttention'")
    try:
        with pytest.raises(TypeError, match=r"Wan 2.1 / 2.2 needs a newer diffusers \(cannot import name 'WanAttention'"):
            apply_nag(OldWan())
    finally:
        registry._UNAVAILABLE.pop("Wan 2.1 / 2.2")


def test_the_family_loader_skips_what_diffusers_lacks_and_raises_everything_else(monkeypatch):
    from nag_kernels.integrations import families, registry

    def missing_in_diffusers(name):
        raise ImportError("cannot import name 'X'", name="diffusers.models.transformers.transformer_x")

    monkeypatch.setattr(families, "FAMILIES", {"x": "Family X"})
    monkeypatch.setattr(families.importlib, "import_module", missing_in_diffusers)
    try:
        families.load_all()
        assert "Family X" in registry.unavailable()
    finally:
        registry._UNAVAILABLE.pop("Family X", None)

    def broken(name):
        raise ImportError("a bug in the family module", name="nag_kernels.integrations.families.x")

    monkeypatch.setattr(families.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="a bug in the family module"):
        families.load_all()
