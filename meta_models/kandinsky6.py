"""Full-size Kandinsky 6 transformers on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` -> the named ``Kandinsky6Transformer3DModel`` on ``torch.device("meta")`` (bfloat16, no memory;
``overrides`` replace config fields, e.g. a tiny config for tests); ``step_inputs(model, variant, resolution)`` -> the
keyword arguments of one step's forwards:

- ``"no_nag"``: one plain forward (video and audio latents 1 row, text 1 row);
- ``"cfg"``: CFG's two forwards (``Kandinsky6TI2VAPipeline`` calls the transformer once per pass, never batched);
- ``"nag"``: the guided forward (latents 1 row, text and mask 2 rows: positive, NAG negative; pooled 1 row).

NAG variants need ``apply_nag``; ``count(name, variant, resolution)`` does all of it and returns TFLOP.

Configs (``transformer/config.json`` of the public Diffusers bundles, as quoted by sglang-diffusion's Kandinsky 6
config tests and vLLM-Omni's Kandinsky 6 block profiler; not downloaded here):

- ``kandinsky6-pro-distill``: ``kandinskylab/Kandinsky-6.0-Pro-distill-5s-Diffusers``, the checkpoint of diffusers'
  ``Kandinsky6TI2VAPipeline`` example: 60 fused blocks of width 4096 (32 heads x 128) with an audio stream of width
  2048 (16 x 128), FFN 16384 / 7168, 4 text blocks per modality, Qwen2.5-VL-7B text of 3584, CLIP-L pooled 768,
  pi-Flow heads of 10 x 16 video and 10 x 40 audio channels;
- ``kandinsky6-pro``: the non-distilled Pro bundle (``Kandinsky-6.0-Pro-sft-5s-Diffusers`` in sglang's tests): the
  same backbone, 16 / 40 output channels;
- ``kandinsky6-lite``: Kandinsky 6.0 Lite (32 blocks of 1792 / 896).

The latents are the HunyuanVideo VAE's (8x spatial, 4x temporal, 16 channels; the transformer takes 2 x 16 + 1 with
the conditioning channels) with the (1, 2, 2) patch; the audio is MMAudio's 44.1 kHz / 1024 latent at 24 fps (40
channels). The text is the pipeline's ``max_sequence_length=1024``: ``_get_prompt_embeds`` pads every prompt to it
(with a mask when padded).
"""

from __future__ import annotations

import math

import torch

from .count import count as count_flops

PRO = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=1024, patch_size=(1, 2, 2),
    model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48), visual_cond=True,
    in_audio_dim=40, out_audio_dim=40, model_dim_a=2048, time_dim_a=1024, ff_dim_a=7168, axes_dims_a=(32, 48, 48),
    audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0), text_token_padding=True, ca_rope=True, cross_gates=True,
    fix_modulation=True, visual_token_type_num_embeddings=2,
)
CONFIGS = {
    "kandinsky6-pro-distill": {**PRO, "out_visual_dim": 160, "out_audio_dim": 400},
    "kandinsky6-pro": PRO,
    "kandinsky6-lite": {**PRO, "time_dim": 512, "model_dim": 1792, "ff_dim": 7168, "num_text_blocks": 2,
                        "num_visual_blocks": 32, "axes_dims": (16, 24, 24), "model_dim_a": 896, "time_dim_a": 512,
                        "ff_dim_a": 3584, "axes_dims_a": (16, 24, 24)},
}
# (width, height, frames): diffusers' example call (864x480, 121 frames = 5 s at 24 fps) and the pipeline's defaults.
RESOLUTIONS = {"864x480x121": (864, 480, 121), "768x512x121": (768, 512, 121)}
FRAME_RATE = 24.0
AUDIO_RATE, AUDIO_HOP = 44100, 1024  # MMAudio VAE: sample rate, latent hop (2 x 512)
TEXT_TOKENS = 1024  # the pipeline's max_sequence_length (every prompt padded to it)
VARIANTS = {"no_nag": (1, 1), "cfg": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of each forward
CALLS = {"no_nag": 1, "cfg": 2, "nag": 1}


def build(name: str = "kandinsky6-pro-distill", dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    from diffusers import Kandinsky6Transformer3DModel

    with torch.device("meta"):
        return Kandinsky6Transformer3DModel(**{**CONFIGS[name], **overrides}).to(dtype).eval()


def latent_grid(resolution) -> tuple[int, int, int]:
    """``(frames, height, width)`` of one video's latents (``resolution``: a ``RESOLUTIONS`` key or a tuple)."""
    width, height, frames = RESOLUTIONS.get(resolution, resolution)
    return (frames - 1) // 4 + 1, height // 8, width // 8


def video_tokens(config, resolution) -> int:
    frames, height, width = latent_grid(resolution)
    p_t, p_h, p_w = config["patch_size"]
    return (frames // p_t) * (height // p_h) * (width // p_w)


def audio_tokens(resolution) -> int:
    """The pipeline's audio length: its formula on the latent frames at 24 fps."""
    frames = latent_grid(resolution)[0]
    return math.ceil(((frames - 1) * 4 + 1) / FRAME_RATE * AUDIO_RATE / AUDIO_HOP)


def step_inputs(model, variant: str, resolution="864x480x121", batch: int = 1, text_tokens: int = TEXT_TOKENS,
                audio: bool = True) -> dict:
    """One forward's arguments (``batch`` videos: every row count times ``batch``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    latents, texts = (n * batch for n in VARIANTS[variant])
    config, meta, dtype = model.config, torch.device("meta"), model.dtype
    channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
    kw = dict(
        hidden_states=torch.empty(latents, *latent_grid(resolution), channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, config.in_text_dim, device=meta, dtype=dtype),
        pooled_projections=torch.empty(latents, config.in_text_dim2, device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        encoder_attention_mask=torch.empty(texts, text_tokens, device=meta, dtype=torch.bool),
        return_dict=False,
    )
    if audio:
        kw["audio_hidden_states"] = torch.empty(latents, audio_tokens(resolution), config.in_audio_dim, device=meta,
                                                dtype=dtype)
    return kw


def flops_inputs(resolution: str, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step (``flops_models``): no NAG, CFG (two forwards, as the pipeline calls them) and the
    guided forward."""
    return {v: [step_inputs(model, v, resolution, batch)] * CALLS[v] for v in VARIANTS}


def count(name: str, variant: str, resolution="864x480x121", model: torch.nn.Module | None = None,
          text_tokens: int = TEXT_TOKENS, audio: bool = True) -> float:
    """TFLOP of one step of ``variant`` (``nag`` with ``apply_nag``, the others unpatched)."""
    from nag_kernels.integrations import apply_nag, remove_nag

    model = build(name) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = step_inputs(model, variant, resolution, text_tokens=text_tokens, audio=audio)
    counted = count_flops(lambda: [model(**kw) for _ in range(CALLS[variant])][-1])
    out = counted.value
    assert out[0].shape[:4] == kw["hidden_states"].shape[:4] and out[0].device.type == "meta"
    return counted.flops / 1e12
