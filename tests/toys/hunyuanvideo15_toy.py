"""Tiny random-weight HunyuanVideo 1.5 components built offline (no downloads): the transformer, both text encoders
with their tokenizers (a byte-level Qwen2 tokenizer with a chat template, diffusers' ByT5 tokenizer), a SigLIP
vision encoder and image processor, the VAE, and both pipelines with a ``ClassifierFreeGuidance`` guider.

The pipelines' fixed lengths (1000 Qwen tokens after a 108-token template, 256 ByT5 tokens, 729 image tokens) and
system message are instance attributes: ``pipeline`` shrinks them so that a call runs in well under a second.
"""

from __future__ import annotations

import torch

TEXT_DIM = 32  # Qwen2.5-VL hidden size
BYT5_DIM = 16  # T5 d_model
VISION_DIM = 16  # SigLIP hidden size
LATENT_CHANNELS = 4
MLLM_TOKENS, BYT5_TOKENS, IMAGE_TOKENS = 40, 16, 4  # the pipelines' lengths, shrunk (image: SigLIP's 2x2 patches)
SYSTEM = "sys"


def transformer(layers: int = 2, seed: int = 0, meanflow: bool = False, refiner_layers: int = 1):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=2,
        attention_head_dim=16, num_layers=layers, num_refiner_layers=refiner_layers, mlp_ratio=2.0,
        text_embed_dim=TEXT_DIM, text_embed_2_dim=BYT5_DIM, image_embed_dim=VISION_DIM, rope_axes_dim=(4, 6, 6),
        target_size=32, use_meanflow=meanflow,
    )
    with torch.no_grad():  # widen diffusers' init so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def tokenizer():
    """A byte-level Qwen2 tokenizer without merges (one token per byte), the chat special tokens and a chat
    template."""
    from transformers import Qwen2Tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def template_tokens(tok) -> int:
    """Tokens before the user's text in the chat template (the pipelines' ``prompt_template_encode_start_idx``)."""
    prefix = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    return len(tok(prefix, add_special_tokens=False).input_ids)


def text_encoder(vocab_size: int):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(4)
    config = Qwen2_5_VLTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=512,
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
    )
    return Qwen2_5_VLTextModel(config).eval()


def text_encoder_2():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    config = T5Config(vocab_size=384, d_model=BYT5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def image_encoder():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(6)
    config = SiglipVisionConfig(hidden_size=VISION_DIM, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=8)
    return SiglipVisionModel(config).eval()


def feature_extractor():
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": 16, "width": 16})


def vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(3)
    return AutoencoderKLHunyuanVideo15(latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8, 8),
                                       layers_per_block=1).eval()


def guider(guidance_scale: float = 3.0):
    from diffusers import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=guidance_scale)


def shrink(pipe):
    """The pipeline's fixed lengths and system message, shrunk for the tiny models (instance attributes)."""
    pipe.system_message = SYSTEM
    pipe.prompt_template_encode_start_idx = template_tokens(pipe.tokenizer)
    pipe.tokenizer_max_length = MLLM_TOKENS
    pipe.tokenizer_2_max_length = BYT5_TOKENS
    if hasattr(pipe, "vision_num_semantic_tokens"):
        pipe.vision_num_semantic_tokens = IMAGE_TOKENS
    return pipe


def components(image_to_video: bool = False, guidance_scale: float = 3.0, meanflow: bool = False) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer

    tok = tokenizer()
    parts = dict(
        transformer=transformer(meanflow=meanflow), vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder(len(tok)), tokenizer=tok, text_encoder_2=text_encoder_2(),
        tokenizer_2=ByT5Tokenizer(), guider=guider(guidance_scale),
    )
    if image_to_video:
        parts.update(image_encoder=image_encoder(), feature_extractor=feature_extractor())
    return parts


def pipeline(image_to_video: bool = False, dtype: torch.dtype = torch.float64, guidance_scale: float = 3.0,
             meanflow: bool = False):
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    cls = HunyuanVideo15ImageToVideoPipeline if image_to_video else HunyuanVideo15Pipeline
    pipe = cls(**components(image_to_video, guidance_scale, meanflow))
    pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return shrink(pipe)


def image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))
