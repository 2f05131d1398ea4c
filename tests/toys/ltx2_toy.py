"""Tiny random-weight LTX-2 components built offline (no model hub), for the LTX-2 integration tests.

Two configurations of ``LTX2VideoTransformer3DModel``, each with its own text connectors:

- ``"2.0"`` (LTX-2.0): caption projections (the ``.view(batch, -1, C)`` fold), no text modulation, interleaved RoPE;
- ``"2.3"`` (LTX-2.3): no caption projection, gated attention, the text K/V input modulated from ``sigma``
  (``cross_attn_mod``), STG-capable processors (``perturbed_attn``), split RoPE, per-modality connector projections;
- ``"2.5"``: as 2.3 with the static prompt table (``use_prompt_adaln_single=False``) and a bias-free video FFN;
- ``"mixed"``: caption projections *and* the sigma text modulation (no public checkpoint; the class allows it).

Video 2 heads x 8 (width 16), audio 2 heads x 4 (width 8), a Gemma3 text encoder of width 16 (2 layers, so the
connectors take 16 x 3 channels) with a tokenizer built in code, 16 text tokens, a two-level video VAE (4x in space
and time: 32x32, 5 frames -> 2 latent frames of 8x8 = 128 video tokens; 5 audio tokens at 25 fps), the tiny audio
VAE and vocoder.
Parameters are widened (``_widen``) so that the cross-attention visibly matters.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler
from diffusers import LTX2Pipeline, LTX2VideoTransformer3DModel
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

import flux_toy

TEXT_DIM = 16  # Gemma3 width = caption_channels
TEXT_LAYERS = 2
SEQ_LEN = 16  # max_sequence_length used by the tests
SIZE, FRAMES, FPS = 32, 5, 25.0
VIDEO_DIM, AUDIO_DIM = 16, 8
CHANNELS, AUDIO_CHANNELS = 4, 4
VERSIONS = ("2.0", "2.3", "2.5", "mixed")

_CONFIGS = {
    "2.0": dict(rope_type="interleaved"),
    "2.3": dict(rope_type="split", gated_attn=True, audio_gated_attn=True, cross_attn_mod=True,
                audio_cross_attn_mod=True, use_prompt_embeddings=False, perturbed_attn=True),
    "2.5": dict(rope_type="split", gated_attn=True, audio_gated_attn=True, cross_attn_mod=True,
                audio_cross_attn_mod=True, use_prompt_embeddings=False, perturbed_attn=True,
                use_prompt_adaln_single=False, ff_bias=False),
    "mixed": dict(rope_type="interleaved", cross_attn_mod=True, audio_cross_attn_mod=True, gated_attn=True),
}


def text_width(version: str) -> tuple[int, int]:
    """The widths of ``encoder_hidden_states`` and ``audio_encoder_hidden_states`` the transformer takes."""
    if _CONFIGS[version].get("use_prompt_embeddings", True):
        return TEXT_DIM, TEXT_DIM
    return VIDEO_DIM, AUDIO_DIM


def _widen(model, std: float = 0.4):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model


def transformer(version: str = "2.0", layers: int = 2, seed: int = 0, **extra) -> LTX2VideoTransformer3DModel:
    torch.manual_seed(seed)
    model = LTX2VideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=VIDEO_DIM, audio_in_channels=AUDIO_CHANNELS,
        audio_out_channels=AUDIO_CHANNELS, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=AUDIO_DIM, num_layers=layers, caption_channels=TEXT_DIM,
        **{"vae_scale_factors": (2, 2, 2), **_CONFIGS[version], **extra},
    )
    return _widen(model).eval()


def connectors(version: str = "2.0", registers: int | None = None) -> LTX2TextConnectors:
    torch.manual_seed(4)
    modality = not _CONFIGS[version].get("use_prompt_embeddings", True)
    return LTX2TextConnectors(
        caption_channels=TEXT_DIM, text_proj_in_factor=TEXT_LAYERS + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=registers,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=4 if modality else 8,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=registers,
        connector_rope_base_seq_len=32, rope_double_precision=False, rope_type=_CONFIGS[version]["rope_type"],
        per_modality_projections=modality, video_hidden_dim=VIDEO_DIM, audio_hidden_dim=AUDIO_DIM,
        video_gated_attn=modality, audio_gated_attn=modality,
    ).eval()


def text_encoder(vocab_size: int) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(2)
    text = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32,
                            num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            max_position_embeddings=64, sliding_window=8, pad_token_id=0)
    vision = SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                image_size=8, patch_size=4)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                       mm_tokens_per_image=4)).eval()


def tokenizer():
    """The T5 tokenizer of flux_toy, as the LTX-2 pipelines use their tokenizer (left padding, ``max_length``)."""
    tok = flux_toy.t5_tokenizer()
    tok.model_max_length = SEQ_LEN
    tok.padding_side = "left"  # as Gemma's: some pipelines read it once, when they are built
    return tok


def vae() -> AutoencoderKLLTX2Video:
    torch.manual_seed(3)
    model = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=CHANNELS, block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False,) * 3, downsample_type=("spatiotemporal", "spatial"),
        upsample_residual=(False,) * 2, upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    model.use_framewise_encoding = model.use_framewise_decoding = False
    return model.eval()


def audio_vae() -> AutoencoderKLLTX2Audio:
    torch.manual_seed(5)
    return AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()


def vocoder() -> LTX2Vocoder:
    torch.manual_seed(6)
    return LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    ).eval()


def components(version: str = "2.0", layers: int = 2, registers: int | None = None, **extra) -> dict:
    tok = tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), audio_vae=audio_vae(),
        text_encoder=text_encoder(len(tok)), tokenizer=tok, connectors=connectors(version, registers),
        transformer=transformer(version, layers, **extra), vocoder=vocoder(),
    )


def pipeline(cls=LTX2Pipeline, version: str = "2.0", dtype: torch.dtype = torch.float64, **kw):
    parts = components(version, **kw)
    optional = getattr(cls, "_optional_components", [])
    parts.update({name: None for name in optional if name not in parts})
    pipe = cls(**{k: v for k, v in parts.items() if k in _init_names(cls)})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _init_names(cls) -> set:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}
