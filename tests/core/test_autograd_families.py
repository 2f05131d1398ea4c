"""Guided forwards with autograd on: every family and mode backpropagates the right gradient.

A direct transformer call with the guided layout (text ``2B`` rows, latents ``B``; docs/spec.md, "The guided call")
outside ``torch.no_grad()`` is NAG-guided fine-tuning or distillation. For each family and mode a tiny random-weight
model runs such a forward in float64, and the gradients of ``<out, w>`` w.r.t. the latents and one key projection of
a guided attention (its keys reach the loss through the split attention's log-sum-exps too) are compared with
central finite differences along random directions.

diffusers computes a few steps in float32 even for float64 inputs (``RMSNorm``'s mean square, ``.float()`` around
RoPE and Wan's norms); their rounding is larger than central differences can resolve. The fixture
``float64_throughout`` lifts those steps to float64 for the test (the NAG code is untouched), so that the finite
differences (Richardson-extrapolated) are accurate to about 1e-8.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models import normalization

import chroma_toy
import flux2_toy
import flux_toy
import ltx_toy
import qwenimage_toy
import sd3_toy
import sdxl_toy
import wan_toy
import zimage_toy
from nag_kernels.integrations import apply_nag, parallel

pytestmark = pytest.mark.usefixtures("single_thread", "float64_throughout")

# Strong enough that the tau clamp acts on some tokens. L2: the L1 norm's kinks (|g_i| at g_i = 0) lie close enough
# to the test points to spoil central differences; the combine's L1 gradient is checked in the op tests.
NAG = dict(nag_scale=8.0, nag_tau=1.5, nag_alpha=0.5, norm="l2")
B, T = 2, 8  # latent rows, text tokens
STEP = 1e-3  # central-difference step (see directional_derivatives)
RTOL = 1e-6  # the finite differences agree to ~1e-7 at worst; a lost LSE gradient shows as 1e-5 to 1


@pytest.fixture
def float64_throughout(monkeypatch):
    float32 = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float32(self, *args, **kwargs)

    def rms_norm(self, x):  # diffusers' RMSNorm without its float32 mean square
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight
            if self.bias is not None:
                x = x + self.bias
        return x

    monkeypatch.setattr(torch.Tensor, "float", keep_float64)
    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_norm)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def flux_ids(n_image, side, width=3):
    ids = torch.zeros(n_image, width)
    ids[:, 1], ids[:, 2] = torch.arange(n_image) // side, torch.arange(n_image) % side
    return ids


def full(value):
    return torch.full((B,), value, dtype=torch.float64)


# Each case builds (model with NAG applied, latents, forward(latents) -> output, the weight whose gradient is checked).


def flux(mode):
    model = apply_nag(flux_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, 64, 16, g=g)
    kw = dict(encoder_hidden_states=randn(2 * B, T, flux_toy.TEXT_DIM, g=g),
              pooled_projections=randn(2 * B, flux_toy.TEXT_DIM, g=g), timestep=full(0.7), img_ids=flux_ids(64, 8),
              txt_ids=torch.zeros(T, 3))
    weight = model.single_transformer_blocks[0].attn.to_k.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def chroma(mode):
    model = apply_nag(chroma_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, 64, 16, g=g)
    text = torch.zeros(2 * B, T)
    for row, length in enumerate((8, 6, 3, 5)):  # each text row its own padding; Chroma's 0/1 float mask
        text[row, :length] = 1
    kw = dict(encoder_hidden_states=randn(2 * B, T, chroma_toy.TEXT_DIM, g=g), timestep=full(0.7),
              img_ids=flux_ids(64, 8), txt_ids=torch.zeros(T, 3),
              attention_mask=torch.cat([text, torch.ones(2 * B, 64)], dim=1).double())
    weight = model.transformer_blocks[0].attn.add_k_proj.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def flux2(mode):
    model = apply_nag(flux2_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, 16, 16, g=g)
    txt_ids = torch.zeros(B, T, 4)
    txt_ids[..., 3] = torch.arange(T)
    kw = dict(encoder_hidden_states=randn(2 * B, T, flux2_toy.TEXT_DIM, g=g), timestep=full(0.7),
              img_ids=flux_ids(16, 4, width=4), txt_ids=txt_ids)
    weight = model.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def sd3(mode):
    model = apply_nag(sd3_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, sd3_toy.LATENT_CHANNELS, 8, 8, g=g)
    kw = dict(encoder_hidden_states=randn(2 * B, T, sd3_toy.TEXT_DIM, g=g),
              pooled_projections=randn(2 * B, 2 * sd3_toy.CLIP_DIM, g=g), timestep=full(500.0))
    weight = model.transformer_blocks[0].attn.to_k.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def qwenimage(mode):
    model = apply_nag(qwenimage_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, 64, 16, g=g)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    for row, length in enumerate((8, 6, 3, 5)):
        mask[row, length:] = 0
    kw = dict(encoder_hidden_states=randn(2 * B, T, qwenimage_toy.TEXT_DIM, g=g), encoder_hidden_states_mask=mask,
              timestep=full(0.6), img_shapes=[[(1, qwenimage_toy.SIDE, qwenimage_toy.SIDE)]] * B)
    weight = model.transformer_blocks[0].attn.to_k.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def zimage(mode):
    model = apply_nag(zimage_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    x = torch.stack(zimage_toy.latents(1))  # one image; captions of 5 (positive) and 40 (NAG-negative) tokens
    caps, t = zimage_toy.captions([5, 40]), torch.full((1,), 0.3, dtype=torch.float64)
    weight = model.layers[0].attention.to_k.weight

    def forward(x):
        return torch.stack(model(list(x.unbind(0)), t, caps, return_dict=False)[0])

    return model, x, forward, weight


def wan(mode):
    model = apply_nag(wan_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, *wan_toy.LATENT, g=g)
    kw = dict(encoder_hidden_states=randn(2 * B, T, wan_toy.TEXT_DIM, g=g), timestep=full(700.0))
    weight = model.blocks[0].attn2.to_k.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


def sdxl(mode):
    model = apply_nag(sdxl_toy.unet().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    x = randn(B, *sdxl_toy.LATENT, g=g)
    kw = dict(timestep=torch.tensor(700.0, dtype=torch.float64),
              encoder_hidden_states=randn(2 * B, T, sdxl_toy.TEXT_DIM, g=g),
              added_cond_kwargs=dict(text_embeds=randn(B, sdxl_toy.POOLED_DIM, g=g),
                                     time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * B).double()))
    weight = model.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    return model, x, lambda x: model(sample=x, **kw, return_dict=False)[0], weight


def ltx(mode):
    model = apply_nag(ltx_toy.transformer().double(), mode=mode, backend="torch", **NAG)
    g = torch.Generator().manual_seed(0)
    frames, height, width = ltx_toy.LATENT
    x = randn(B, frames * height * width, ltx_toy.CHANNELS, g=g)
    mask = torch.ones(2 * B, T)
    mask[torch.arange(2 * B), T - 1 - torch.arange(2 * B) % 3] = 0  # a different padding per text row
    kw = dict(encoder_hidden_states=randn(2 * B, T, ltx_toy.TEXT_DIM, g=g), timestep=full(700.0),
              encoder_attention_mask=mask, num_frames=frames, height=height, width=width)
    weight = model.transformer_blocks[0].attn2.to_k.weight
    return model, x, lambda x: model(hidden_states=x, **kw, return_dict=False)[0], weight


CASES = {
    "flux-exact": (flux, "exact"), "flux-fast": (flux, "fast"),
    "chroma-exact": (chroma, "exact"), "chroma-fast": (chroma, "fast"),
    "flux2-exact": (flux2, "exact"), "flux2-fast": (flux2, "fast"),
    "sd3": (sd3, "exact"),
    "qwenimage": (qwenimage, "exact"),
    "zimage-exact": (zimage, "exact"), "zimage-fast": (zimage, "fast"),
    "wan": (wan, "exact"),
    "sdxl": (sdxl, "exact"),
    "ltx": (ltx, "exact"),
}


def directional_derivatives(forward, x, weight, w, directions):
    """``d/dh <forward(x + h d_x; weight + h d_weight), w>`` at ``h = 0`` for each ``(d_x, d_weight)``: central
    differences at steps ``STEP`` and ``STEP / 2`` combined by Richardson extrapolation (error ``O(STEP^4)``)."""

    def central(d_x, d_weight, step):
        values = []
        for sign in (1, -1):
            weight.add_(sign * step * d_weight)
            values.append((forward(x + sign * step * d_x) * w).sum())
            weight.sub_(sign * step * d_weight)
        return (values[0] - values[1]) / (2 * step)

    with torch.no_grad():
        return torch.stack([
            (4 * central(d_x, d_weight, STEP / 2) - central(d_x, d_weight, STEP)) / 3 for d_x, d_weight in directions
        ])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_guided_forward_backpropagates_the_finite_difference_gradient(case):
    build, mode = case
    model, x, forward, weight = build(mode)
    x = x.clone().requires_grad_()
    out = forward(x)  # grad mode on: the guided forward records autograd (it must not refuse, nor cut the graph)
    assert out.shape[0] == x.shape[0] and out.requires_grad
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grad_x, grad_weight = torch.autograd.grad((out * w).sum(), (x, weight))

    g = torch.Generator().manual_seed(2)
    d_x = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(2)]
    d_weight = [torch.randn(weight.shape, generator=g, dtype=weight.dtype) for _ in range(2)]
    zero_x, zero_weight = torch.zeros_like(x), torch.zeros_like(weight)
    directions = [(d, zero_weight) for d in d_x] + [(zero_x, d) for d in d_weight]
    numeric = directional_derivatives(forward, x.detach(), weight, w, directions)
    analytic = torch.stack([(grad_x * d).sum() for d in d_x] + [(grad_weight * d).sum() for d in d_weight])
    error = ((analytic - numeric).abs() / numeric.abs()).max().item()
    assert error < RTOL, f"relative error {error:.2e}: analytic {analytic.tolist()}, finite differences {numeric.tolist()}"


def test_flux_exact_combines_in_place_only_without_grad(monkeypatch):
    """FLUX.1's exact single blocks combine in place (``out=``) under ``torch.no_grad()`` and out of place with
    autograd on; both give the same output."""
    model, x, forward, _ = flux("exact")
    combine, in_place = parallel.combine, []

    def spy(z_pos, z_neg, nag, group=None, out=None):
        in_place.append(out is not None)
        return combine(z_pos, z_neg, nag, group, out=out)

    monkeypatch.setattr(parallel, "combine", spy)  # the single blocks' combine (the double blocks split)
    singles = len(model.single_transformer_blocks)
    with torch.no_grad():
        inference = forward(x)
    assert in_place == [True] * singles
    in_place.clear()
    recorded = forward(x.clone().requires_grad_())
    assert in_place == [False] * singles and recorded.requires_grad
    torch.testing.assert_close(recorded.detach(), inference, rtol=0, atol=1e-12)
