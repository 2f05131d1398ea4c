"""Random-weight Flux models built in code, nothing downloaded: the one place benchmarks build them.

- ``transformer(config, device, dtype)``: a ``FluxTransformer2DModel`` of any config (``meta_models.flux.FLUX1``,
  about 12B parameters, or the ``FLUX_TINY`` toy) built straight on ``device`` in ``dtype``: constructed on the meta
  device, cast, then ``to_empty`` and filled with ``N(0, 1/fan_in)`` weights, zero biases and unit norm weights, so
  no fp32 copy of the model is ever made and activations stay finite. (The flops suite's FLUX.1 on meta, without
  weights: ``meta_models.flux.build``.)
- ``tiny_pipeline(dtype)``: a whole ``FluxPipeline`` around the ``FLUX_TINY`` transformer (character-level
  tokenizers, 2-layer CLIP and T5 text encoders, a 2-level VAE), for running the quality suite on a CPU; its images
  are noise.
"""

from __future__ import annotations

import string

import torch

from meta_models.flux import FLUX_TINY


def transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A FluxTransformer2DModel with random weights, built directly on ``device`` in ``dtype`` (no fp32 copy)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype).to_empty(device=device)  # the cast on meta: free
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)  # unit-variance outputs for unit-variance inputs
            elif name.endswith("weight"):
                p.fill_(1.0)  # the only 1-D weights in Flux are norm scales (RMSNorm of q/k)
            else:
                p.zero_()  # biases
        for name, b in model.named_buffers():  # FLUX.1 has none today; a future one must not stay uninitialised
            raise RuntimeError(f"unexpected buffer {name} in FluxTransformer2DModel: the random init must handle it")
    return model.eval()


def tiny_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``FluxPipeline`` of random components: character-level tokenizers, 2-layer CLIP and T5 text encoders, a
    2-level VAE (8x downsampling overall with the 2x2 packing) and the ``FLUX_TINY`` transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    symbols = string.ascii_lowercase + string.digits + ".,'-"
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in symbols:
        clip_vocab[ch] = len(clip_vocab)
        clip_vocab[ch + "</w>"] = len(clip_vocab)
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    # sentencepiece-style unigram vocabulary: a word-initial and an inner piece per character
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + ch, -1.0) for ch in symbols] + [(ch, -2.0) for ch in symbols]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0)

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=FLUX_TINY["pooled_projection_dim"], intermediate_size=64,
        num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=FLUX_TINY["joint_attention_dim"], d_ff=96, d_kv=16, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=FLUX_TINY["in_channels"] // 4, norm_num_groups=4, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.5,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok,
        text_encoder_2=t5.eval(), tokenizer_2=t5_tok,
        transformer=transformer(FLUX_TINY, torch.device("cpu"), torch.float32, seed=seed),
    )
    return pipe.to(dtype=dtype)
