"""Model configurations the benchmarks take their shapes from, with where each number comes from.

A NAG combine input is ``[batch, tokens, channels]``: the attention output of the image (or video) tokens, heads
merged (``channels = heads * head_dim``). Tokens follow from the resolution: latent = pixels / VAE factor, then
patchified. Nothing here is downloaded; the numbers are read off the models' published configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from meta_models.flux import FLUX1
from meta_models.flux import image_tokens as flux_image_tokens


@dataclass(frozen=True)
class ModelShape:
    name: str
    batch: int
    tokens: int
    channels: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.batch, self.tokens, self.channels)


# FLUX.1 (meta_models/flux.py: its config, the toy's, and the token count of an image): 24 heads x 128 = 3072.
FLUX_CHANNELS = FLUX1["num_attention_heads"] * FLUX1["attention_head_dim"]


# Wan 2.1 T2V-14B (Wan-AI/Wan2.1-T2V-14B, config.json): dim 5120 (40 heads x 128). The VAE compresses time 4x
# (81 frames: (81 - 1) / 4 + 1 = 21 latent frames) and space 8x, patch (1, 2, 2). 480p = 832x480:
# 21 * (480 / 16) * (832 / 16) = 21 * 30 * 52 = 32760 tokens; 720p = 1280x720: 21 * 45 * 80 = 75600 tokens.
# Cross-attention: NAG acts on attn2's output. Batch 1 (NAG replaces CFG's second pass).
WAN14B_CHANNELS = 40 * 128
WAN_LATENT_FRAMES_81 = (81 - 1) // 4 + 1


def wan_tokens(height: int, width: int, latent_frames: int = WAN_LATENT_FRAMES_81) -> int:
    return latent_frames * (height // 16) * (width // 16)


# SD3.5 Large (stabilityai/stable-diffusion-3.5-large, transformer/config.json): 38 heads x 64 = 2432; 1024^2:
# 128x128 latent, patch 2 -> 4096 image tokens. Batch 2 = the CFG batch (uncond + cond) of the stock pipeline.
SD35L_CHANNELS = 38 * 64
SD35L_1024_TOKENS = (1024 // 8 // 2) ** 2

# SDXL (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): block_out_channels [320, 640, 1280], attention
# in the second and third levels (head dim 64). At 1024^2 the 128x128 latent is downsampled once for the second level
# (640 channels, 64 x 64 = 4096 tokens) and twice for the third level and the mid block (1280 channels, 32 x 32 =
# 1024 tokens). Batch 2 = the CFG batch.
SDXL_LEVEL2_CHANNELS, SDXL_1024_LEVEL2_TOKENS = 640, (1024 // 8 // 2) ** 2
SDXL_LEVEL3_CHANNELS, SDXL_1024_LEVEL3_TOKENS = 1280, (1024 // 8 // 4) ** 2

# Qwen-Image (Qwen/Qwen-Image, transformer/config.json): 24 heads x 128 = 3072; VAE 8x, patch 2. Its native 1328^2:
# 1328 / 16 = 83 -> 83 * 83 = 6889 image tokens. Batch 1.
QWEN_IMAGE_CHANNELS = 24 * 128
QWEN_IMAGE_1328_TOKENS = (1328 // 16) ** 2


def _flux(res: int, batch: int) -> ModelShape:
    return ModelShape(
        f"flux-{res}-b{batch}",
        batch,
        flux_image_tokens(res),
        FLUX_CHANNELS,
        f"FLUX.1 {res}x{res}: ({res}/16)^2 image tokens, 24 heads x 128, batch {batch}",
    )


KERNEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in [
        _flux(1024, 1),
        _flux(1024, 2),
        _flux(1024, 4),
        _flux(2048, 1),
        _flux(2048, 2),
        _flux(2048, 4),
        ModelShape("wan14b-480p", 1, wan_tokens(480, 832), WAN14B_CHANNELS,
                   "Wan2.1-14B 832x480, 81 frames: 21x30x52 tokens, 40 heads x 128"),
        ModelShape("wan14b-720p", 1, wan_tokens(720, 1280), WAN14B_CHANNELS,
                   "Wan2.1-14B 1280x720, 81 frames: 21x45x80 tokens, 40 heads x 128"),
        ModelShape("sd35l-1024", 2, SD35L_1024_TOKENS, SD35L_CHANNELS, "SD3.5-Large 1024^2: 4096 tokens, 38x64, CFG batch"),
        ModelShape("sdxl-1024", 2, SDXL_1024_LEVEL2_TOKENS, SDXL_LEVEL2_CHANNELS,
                   "SDXL 1024^2, second UNet level (first with attention): 64x64 tokens, 640 channels, CFG batch"),
        ModelShape("sdxl-1024-1280ch", 2, SDXL_1024_LEVEL3_TOKENS, SDXL_LEVEL3_CHANNELS,
                   "SDXL 1024^2, third UNet level and mid block: 32x32 tokens, 1280 channels, CFG batch"),
        ModelShape("qwen-image-1328", 1, QWEN_IMAGE_1328_TOKENS, QWEN_IMAGE_CHANNELS,
                   "Qwen-Image 1328^2: 83x83 tokens, 24 heads x 128"),
    ]
}

# Small shapes that keep a CPU run (and CI) to seconds. flux-1024-b1 stays: the CPU backend target is at that shape.
QUICK_KERNEL_SHAPES = ["flux-1024-b1", "sdxl-1024"]

# Tiny shapes for the pytest checks of the harness (Triton runs interpreted there).
TEST_KERNEL_SHAPES: dict[str, ModelShape] = {
    "tiny-odd": ModelShape("tiny-odd", 2, 37, 200, "odd toy shape for tests"),
}


def kernel_shape(name: str) -> ModelShape:
    try:
        return KERNEL_SHAPES.get(name) or TEST_KERNEL_SHAPES[name]
    except KeyError:
        known = ", ".join([*KERNEL_SHAPES, *TEST_KERNEL_SHAPES])
        raise SystemExit(f"unknown shape {name!r}; known: {known}") from None
