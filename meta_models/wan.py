"""Full-size Wan transformers on the meta device and one denoising step's inputs per variant, for FLOP counting.

``build(name)`` returns the named model (configs as in the public ``transformer/config.json`` files) on the meta
device in bfloat16; ``step_inputs(model, variant, resolution)`` the keyword arguments of one step's transformer
work: ``"no_nag"`` (one plain forward), ``"cfg"`` (the conditional and the unconditional pass, counted as one
forward at batch 2: the same FLOPs as Wan's two calls) or ``"nag"`` (one guided forward: 2 text rows, 1 video row;
the model must be patched with ``apply_nag``).
"""

from __future__ import annotations

import torch

BASE_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
CONFIGS = {
    "wan2.1-t2v-14b": BASE_14B,
    "wan2.1-t2v-1.3b": {**BASE_14B, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2.1-i2v-14b": {**BASE_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "wan2.2-t2v-a14b": BASE_14B,  # each of the two experts; one runs per step
    "wan2.2-ti2v-5b": {**BASE_14B, "num_attention_heads": 24, "in_channels": 48, "out_channels": 48,
                       "ffn_dim": 14336, "num_layers": 30},
}
# (width, height) in pixels; 81 frames. Wan 2.2 TI2V-5B's 720p is 1280x704 (its VAE compresses 16x spatially).
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
FRAMES = 81
TEXT_TOKENS = 512  # Wan pads the UMT5 text to 512 tokens
IMAGE_TOKENS = 257  # Wan 2.1 I2V: CLIP image tokens
VARIANTS = ("no_nag", "cfg", "nag")


def build(name: str) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**CONFIGS[name]).to(torch.bfloat16).eval()


def latent_shape(name: str, resolution: str) -> tuple[int, int, int, int]:
    """``(channels, frames, height, width)`` of one video's latents."""
    width, height = RESOLUTIONS[resolution]
    if name == "wan2.2-ti2v-5b":
        spatial, height = 16, (704 if resolution == "720p" else height)
    else:
        spatial = 8
    return CONFIGS[name]["in_channels"], (FRAMES - 1) // 4 + 1, height // spatial, width // spatial


def video_tokens(name: str, resolution: str) -> int:
    _, frames, height, width = latent_shape(name, resolution)
    return frames * (height // 2) * (width // 2)


def step_inputs(model: torch.nn.Module, variant: str, resolution: str, name: str = "wan2.1-t2v-14b") -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    videos = 2 if variant == "cfg" else 1
    texts = 2
    if variant == "no_nag":
        texts = 1
    kw = dict(
        hidden_states=torch.empty(videos, *latent_shape(name, resolution), device=meta, dtype=dtype),
        timestep=torch.empty(videos, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, TEXT_TOKENS, model.config.text_dim, device=meta, dtype=dtype),
        return_dict=False,
    )
    if model.config.image_dim is not None:
        kw["encoder_hidden_states_image"] = torch.empty(
            videos, IMAGE_TOKENS, model.config.image_dim, device=meta, dtype=dtype)
    return kw
