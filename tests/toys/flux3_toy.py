"""Tiny random-weight FLUX.3 components built offline (no model hub), for the FLUX.3 integration tests.

The transformer: 2 per-mode blocks per mode and 2 single-stream blocks of 2 heads x 8 (width 16), RoPE over 4 axes
of 2, 16 latent channels per token; ``flow_map=True`` adds the target-timestep embedder of the step-distilled
checkpoints. The modular components: a 32-layer Qwen3-VL of width 16 (the text-encoder step stacks layers 4, 8, ...,
32: ``joint_attention_dim = 8 x 16``), a word-level tokenizer with a Qwen chat template behind a processor-like
object (``tokenizer`` + ``apply_chat_template``: what ``Flux3TextEncoderStep`` reads of an ``AutoProcessor``; the
real ``Qwen3VLProcessor`` needs torchvision), the FLUX.3 scheduler (constant shift 6.93). No VAE: the tests compare
the denoised latents (image-to-image takes ``image_cond_latents`` directly).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel

TEXT_HIDDEN = 16  # the Qwen3-VL width
TAPS = 8  # Flux3TextEncoderStep stacks hidden states 4, 8, ..., 32
JOINT = TAPS * TEXT_HIDDEN
CHANNELS = 16  # latent channels per token (in_channels, cond_in_channels)
SIZE = 32  # pixels: a 2x2 grid of tokens (the VAE's 8x and 2x2 packing: 16 px per token)
IMAGE_TOKENS = (SIZE // 16) ** 2
PAD = 80  # Flux3TextEncoderStep's pad multiple

WORDS = (
    "user assistant a cat dog red blue sky blurry dark low quality on in snow fox bright sharp ugly noisy grainy "
    "washed out overexposed deformed extra fingers watermark text logo"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def transformer(layers: int = 2, single_layers: int = 2, seed: int = 0, flow_map: bool = False, **overrides):
    torch.manual_seed(seed)
    config = dict(
        in_channels=CHANNELS, cond_in_channels=CHANNELS, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT, timestep_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2), rope_theta=1000, flow_map=flow_map,
    )
    model = Flux3Transformer2DModel(**{**config, **overrides})
    with torch.no_grad():  # widen the init (unit norms, small linears) so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.6 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1)
    return model.eval()


class Processor:
    """What ``Flux3TextEncoderStep`` uses of the Qwen3-VL ``AutoProcessor``: ``apply_chat_template`` and
    ``tokenizer``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def tokenizer():
    """A word-level tokenizer: words and newlines are tokens, ``<|im_start|>`` / ``<|im_end|>`` special, padding with
    ``<|endoftext|>`` (as the Qwen3 tokenizer)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {token: i for i, token in enumerate([*specials, "\n", ",", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|<\|\w+\|>|\w+|[^\w\s]"), behavior="removed", invert=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def text_encoder(vocab_size: int, layers: int = 32):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(1)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=6.93)


def components(dtype=torch.float64, flow_map: bool = False, seed: int = 0) -> dict:
    """The modular blocks' components (no VAE, no prompt upsampler)."""
    tok = tokenizer()
    return dict(
        transformer=transformer(flow_map=flow_map, seed=seed).to(dtype),
        text_encoder=text_encoder(len(tok)).to(dtype),
        tokenizer=Processor(tok),
        scheduler=scheduler(),
    )


@pytest.fixture
def float64_throughout(monkeypatch):
    """diffusers computes FLUX.3's QK norms (``x.float()``), RoPE (``x.float()``) and the RoPE tables (``.float()``)
    in float32 even in a float64 model; for comparisons at 1e-10 those steps stay float64 here (``Tensor.float``
    keeps float64 tensors as they are). The NAG code is untouched."""
    float32 = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float32(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", keep_float64)
