"""An independent float64 implementation of NAG on LTX-2 (docs/families/ltx2.md, "What a guided forward computes").

``reference_model(model, scale, tau, alpha)`` returns an unpatched copy of ``model`` whose text cross-attentions
(``attn2``, ``audio_attn2``) run ``ReferenceTextAttention``, and ``reference_forward(ref, **kw)`` runs it on a
guided call's inputs (``L`` latent rows, ``L + g`` text rows) in the **2B layout**: the latent rows of the ``g``
guided rows are repeated (with their timesteps, sigmas, coords, perturbation and keyframe rows) so that every text
row has a latent row of its own, and the stock model runs at ``L + g`` rows (no fold, no modulation to fix). In each
text cross-attention every row attends over its own text with its own mask (softmax written out, float64), is gated
(gated attention) and the combine (docs/spec.md, "The combine", L1, factor form) of each guided row with its
NAG-negative row is written into both rows, before ``to_out``. Both copies of a guided latent row then stay equal
through everything else (per-row computations, same modulation), so the first ``L`` output rows are the guided
forward's output. None of this calls NAG's code.
"""

from __future__ import annotations

import copy

import torch

TEXT = ("attn2", "audio_attn2")
PER_LATENT_ROW = ("hidden_states", "audio_hidden_states", "timestep", "audio_timestep", "sigma", "audio_sigma",
                  "video_coords", "audio_coords", "perturbation_mask", "video_self_attention_mask",
                  "video_keyframes_mask")


def combine(z_pos, z_neg, scale, tau, alpha):
    g = scale * z_pos - (scale - 1) * z_neg
    n_pos, n_g = z_pos.abs().sum(-1, keepdim=True), g.abs().sum(-1, keepdim=True)
    factor = torch.where(n_g > 0, torch.clamp(tau * n_pos / n_g, max=1.0), torch.ones_like(n_g))
    return alpha * factor * g + (1 - alpha) * z_pos


class ReferenceTextAttention:
    """A text cross-attention over ``R`` rows, each with its own text and mask; the last ``guided`` rows are the
    NAG-negative rows of the ``guided`` rows before them (``pairs``: set per call by ``reference_forward``)."""

    def __init__(self, settings: dict, own: dict | None = None):
        self.settings, self.own = settings, own or {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, **kwargs):
        assert query_rotary_emb is None
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(encoder_hidden_states))
        v = attn.to_v(encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))  # [R, H, S, D]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attention_mask is not None:  # the model's [R, 1, T] bias (or a [R, T] / [R, 1, 1, T] one)
            mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, attention_mask.shape[-1])
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2)  # [R, S, H, D]
        if attn.to_gate_logits is not None:
            out = out * (2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))).unsqueeze(-1)
        out = out.flatten(2, 3)
        guided = self.settings.get("guided", 0)
        if guided:
            rows = out.shape[0] - guided
            s = {**self.settings, **self.own}
            combined = combine(out[rows - guided: rows], out[rows:], s["scale"], s["tau"], s["alpha"])
            out = torch.cat([out[: rows - guided], combined, combined])
        return attn.to_out[1](attn.to_out[0](out))


def reference_model(model, scale=9.0, tau=3.5, alpha=0.25, audio=None):
    """``audio``: the audio stream's own ``{"scale": ..., "tau": ..., "alpha": ...}`` (default: the video's)."""
    ref = copy.deepcopy(model)
    settings = {"scale": scale, "tau": tau, "alpha": alpha}
    for name, module in ref.named_modules():
        if name.rsplit(".", 1)[-1] in TEXT:
            own = audio if name.endswith("audio_attn2") else None
            module.set_processor(ReferenceTextAttention(settings, own))
    ref._reference_settings = settings
    return ref


def reference_forward(ref, **kw):
    """``ref`` on a call with ``L`` latent rows and ``L + g`` text rows, in the 2B layout; returns the ``L`` rows of
    ``(video, audio)``."""
    rows, text_rows = kw["hidden_states"].shape[0], kw["encoder_hidden_states"].shape[0]
    guided = text_rows - rows
    kw = dict(kw)
    for name in PER_LATENT_ROW:
        x = kw.get(name)
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows and guided:
            kw[name] = torch.cat([x, x[rows - guided:]])
    ref._reference_settings["guided"] = guided
    try:
        with torch.no_grad():
            video, audio = ref(**kw, return_dict=False)
    finally:
        ref._reference_settings["guided"] = 0
    return video[:rows], audio[:rows]
