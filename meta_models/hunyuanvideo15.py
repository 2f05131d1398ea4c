"""The full-size HunyuanVideo 1.5 transformer on the meta device and one denoising step's inputs per variant, for FLOP
counts.

``build(name)`` -> a ``HunyuanVideo15Transformer3DModel`` on ``torch.device("meta")`` (bfloat16, no memory) with the
public 8.3B config: diffusers 0.42.1's class defaults, which are tencent/HunyuanVideo-1.5's transformer config in
diffusers' names (hidden 2048 = 16 heads x 128, 54 dual-stream blocks, a 2-layer token refiner, Qwen2.5-VL 3584-wide
text states, ByT5 1472, SigLIP 1152, RoPE axes 16/56/56, latent 32 channels + 32 condition + 1 mask = 65 in); the
480p and 720p, T2V and I2V checkpoints share it (``target_size`` 640 / 960 only picks the pipelines' default
resolution). ``step_inputs(model, variant, resolution)`` -> the forward's keyword arguments for one call:

- ``"plain"``: one video, no guidance; the pipelines' CFG runs it twice (their guider makes one call per pass);
- ``"nag"``: the guided call (the two text encoders' states and masks 2 rows, latents 1 row).

Token counts are the pipelines': 121 frames -> 31 latent frames (VAE 4x in time, 16x in space, patch 1); 720p
(1280x720) 31 x 45 x 80 = 111600 video tokens, 480p (848x480) 31 x 30 x 53 = 49290. The text stream always has
1000 Qwen2.5-VL tokens (after the 108-token template), 256 ByT5 tokens and 729 SigLIP tokens (zeros, masked, for
text-to-video): 1985, whatever the prompt (the masks exclude the padding from attention, not from the FLOPs).

The stock forward cannot run on meta tensors (nor on fake ones): it tests ``torch.all(image_embeds == 0)`` with
Python's ``if`` and moves each row's valid text tokens to the front by boolean indexing, both data-dependent. ``build``
gives the meta model ``_forward_counted``: the stock forward of diffusers 0.42.1 with the text-to-video test taken
from ``t2v`` and the reordering replaced by the concatenation of the same parts in the same order. Moving tokens
costs no FLOPs and the parts' shapes are the same, so the count is the stock forward's; NAG's patches (submodules, a
pre-hook and a forward hook) apply to it as to the stock forward.
"""

from __future__ import annotations

import types

import torch

from .count import count as count_flops

# tencent/HunyuanVideo-1.5 (transformer/480p_t2v ... 720p_i2v; diffusers: hunyuanvideo-community/HunyuanVideo-1.5-*):
# diffusers 0.42.1's HunyuanVideo15Transformer3DModel defaults are that config.
CONFIGS = {
    "hunyuanvideo-1.5": dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
        text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=960,
    ),
}
RESOLUTIONS = {"720p": (1280, 720, 121), "480p": (848, 480, 121)}  # width, height, frames (the pipelines' defaults)
MLLM_TOKENS, BYT5_TOKENS, IMAGE_TOKENS = 1000, 256, 729
TEXT_TOKENS = MLLM_TOKENS + BYT5_TOKENS + IMAGE_TOKENS
VARIANTS = {"plain": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of one call
CALLS = {"no_nag": ("plain",), "cfg": ("plain", "plain"), "nag": ("nag",), "nag_cfg": ("nag", "plain")}


def _forward_counted(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, timestep_r=None,
                     encoder_hidden_states_2=None, encoder_attention_mask_2=None, image_embeds=None,
                     attention_kwargs=None, return_dict=True):
    """diffusers 0.42.1's ``HunyuanVideo15Transformer3DModel.forward`` for the meta device (module docstring)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.config.patch_size_t, self.config.patch_size, self.config.patch_size
    image_rotary_emb = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)
    text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    text = text + self.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
    text_2 = self.context_embedder_2(encoder_hidden_states_2)
    text_2 = text_2 + self.cond_type_embed(torch.ones_like(text_2[:, :, 0], dtype=torch.long))
    image = self.image_embedder(image_embeds)
    if self._nag_meta_t2v:
        image = image * 0.0
    image = image + self.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    make = torch.zeros if self._nag_meta_t2v else torch.ones  # text-to-video: the image tokens are masked out
    mask_3 = make((batch_size, image.shape[1]), dtype=encoder_attention_mask.dtype,
                  device=encoder_attention_mask.device)
    encoder_hidden_states = torch.cat([image, text_2, text], dim=1)  # the stock order: image, ByT5, Qwen
    mask = torch.cat([mask_3.bool(), encoder_attention_mask_2.bool(), encoder_attention_mask.bool()], dim=1)
    for block in self.transformer_blocks:
        hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, temb, mask,
                                                     image_rotary_emb)
    hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
    hidden_states = hidden_states.reshape(batch_size, num_frames // p_t, height // p_h, width // p_w, -1, p_t, p_h,
                                          p_w)
    hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def build(name: str = "hunyuanvideo-1.5", dtype: torch.dtype = torch.bfloat16, t2v: bool = True, **overrides):
    """The model of ``CONFIGS[name]`` (``overrides``: config fields replaced, e.g. a tiny one for tests) on meta."""
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**{**CONFIGS[name], **overrides}).to(dtype).eval()
    model._nag_meta_t2v = t2v
    model.forward = types.MethodType(_forward_counted, model)
    return model


def video_tokens(resolution: str, config=None) -> int:
    width, height, frames = RESOLUTIONS[resolution] if isinstance(resolution, str) else resolution
    patch = getattr(config, "patch_size", 1) if config is not None else 1
    return ((frames - 1) // 4 + 1) * (height // 16 // patch) * (width // 16 // patch)


def step_inputs(model, variant: str, resolution="720p", batch: int = 1, mllm_tokens: int = MLLM_TOKENS,
                byt5_tokens: int = BYT5_TOKENS, image_tokens: int = IMAGE_TOKENS) -> dict:
    """One call's forward arguments (``batch`` videos: every row count times ``batch``; widths from the config).
    ``resolution``: a ``RESOLUTIONS`` name or ``(width, height, frames)``."""
    latents, text = (n * batch for n in VARIANTS[variant])
    width, height, frames = RESOLUTIONS[resolution] if isinstance(resolution, str) else resolution
    meta, dtype, config = torch.device("meta"), model.dtype, model.config
    return dict(
        hidden_states=torch.empty(latents, config.in_channels, (frames - 1) // 4 + 1, height // 16, width // 16,
                                  device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(text, mllm_tokens, config.text_embed_dim, device=meta, dtype=dtype),
        encoder_attention_mask=torch.empty(text, mllm_tokens, device=meta, dtype=dtype),
        encoder_hidden_states_2=torch.empty(text, byt5_tokens, config.text_embed_2_dim, device=meta, dtype=dtype),
        encoder_attention_mask_2=torch.empty(text, byt5_tokens, device=meta, dtype=dtype),
        image_embeds=torch.empty(latents, image_tokens, config.image_embed_dim, device=meta, dtype=dtype),
        return_dict=False,
    )


def flops_inputs(resolution: str, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step (``flops_models``): no NAG, CFG (two plain calls: the pipelines' guider runs the
    passes separately) and the guided call."""
    return {variant: [step_inputs(model, call, resolution, batch) for call in calls]
            for variant, calls in CALLS.items() if variant != "nag_cfg"}


def count(variant: str, resolution="720p", model=None, **tokens) -> float:
    """TFLOP of one step of ``variant`` (``CALLS``) on ``model`` (default: ``build()``), NAG applied for the guided
    call only and removed again."""
    from nag_kernels.integrations import apply_nag, remove_nag

    model = build() if model is None else model
    total = 0.0
    for call in CALLS[variant]:
        kw = step_inputs(model, call, resolution, **tokens)
        if call == "nag":
            apply_nag(model)  # backend "auto": the fake implementation runs on meta
        try:
            counted = count_flops(lambda: model(**kw)[0])
        finally:
            if call == "nag":
                remove_nag(model)
        out = counted.value
        assert out.shape[0] == kw["hidden_states"].shape[0] and out.device.type == "meta"
        total += counted.flops
    return total / 1e12
