"""Full-size FLUX.2 transformers on the meta device and one denoising step's inputs per variant, for FLOP counting.

``build(name)`` returns the named model (configs as in the public ``transformer/config.json`` files, as known here)
on the meta device in bfloat16; ``step_inputs(model, variant, resolution)`` the keyword arguments of one step's
transformer work: ``"no_nag"`` (one plain forward), ``"cfg"`` (conditional and unconditional pass, counted as one
forward at batch 2: the same FLOPs as two calls) or ``"nag"`` (one guided forward, 2 text rows and 1 image row, the
default path: the image stream shared; the model must be patched with ``apply_nag``).

``build(name, shallow=True)`` has one block of each kind; ``repeat(name, model)`` is what ``meta_models.count.count``
needs to count it at the full depth (exact, since a stack's blocks are identical, and 20x quicker). ``nag_2b(name,
model, cfg, plain)`` derives the authors'-style 2B layout for comparison (double blocks share the image stream, single
blocks run it at 2B) from the counts of the ``cfg`` and ``no_nag`` forwards: the CFG count minus the parts that stay
at one row there (the double blocks' image stream, the input and output projections), measured per module.
"""

from __future__ import annotations

import re

import torch

DEV = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
CONFIGS = {
    "flux2-dev": DEV,  # Mistral Small 3.1 text features: 3 x 5120
    "flux2-klein-4b": {**DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                       "joint_attention_dim": 7680, "guidance_embeds": False},  # Qwen3-4B: 3 x 2560
    "flux2-klein-9b": {**DEV, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                       "joint_attention_dim": 12288, "guidance_embeds": False},  # Qwen3-8B: 3 x 4096
}
TEXT_TOKENS = 512  # the pipelines pad the prompt to max_sequence_length=512
VARIANTS = ("no_nag", "cfg", "nag", "nag_2b")  # nag_2b: derived from the cfg and no_nag counts
# Modules that stay at one image row in the 2B layout (the rest runs at two rows, as in CFG).
_ONE_ROW = re.compile(
    r"Flux2Transformer2DModel\.(x_embedder|proj_out|norm_out|transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0)|ff))"
)

_STACKS = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}


def build(name: str, shallow: bool = False) -> torch.nn.Module:
    """The model on meta; ``shallow``: one block of each kind (``repeat`` counts it at the full depth)."""
    from diffusers import Flux2Transformer2DModel

    config = {**CONFIGS[name], **({key: 1 for key in _STACKS.values()} if shallow else {})}
    with torch.device("meta"):
        return Flux2Transformer2DModel(**config).to(torch.bfloat16).eval()


def image_tokens(resolution: int) -> int:
    """Latent tokens of a ``resolution``^2 image (VAE 8x, 2x2 patches)."""
    return (resolution // 16) ** 2


def step_inputs(model: torch.nn.Module, variant: str, resolution: int = 1024, text_tokens: int = TEXT_TOKENS) -> dict:
    if variant not in ("no_nag", "cfg", "nag"):
        raise ValueError(f"variant must be one of no_nag, cfg, nag, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    images, texts = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2)}[variant]
    n = image_tokens(resolution)
    return dict(
        hidden_states=torch.empty(images, n, model.config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, model.config.joint_attention_dim, device=meta,
                                          dtype=dtype),
        timestep=torch.empty(images, device=meta, dtype=dtype),
        guidance=torch.empty(images, device=meta, dtype=dtype) if model.config.guidance_embeds else None,
        img_ids=torch.zeros(n, 4, device=meta),
        txt_ids=torch.zeros(text_tokens, 4, device=meta),
        return_dict=False,
    )


def repeat(name: str, model: torch.nn.Module) -> dict[str, int]:
    """``count``'s ``repeat`` for ``model`` standing for ``name``: each stack's first block counted once more per
    block ``model`` lacks (nothing for the full-depth model)."""
    root = type(model).__name__
    return {f"{root}.{stack}.0": CONFIGS[name][key] - model.config[key] for stack, key in _STACKS.items()}


def nag_2b(name: str, model: torch.nn.Module, cfg, plain) -> int:
    """FLOPs of the authors'-style 2B layout: ``cfg`` (the ``cfg`` forward's count, at the full depth) minus the
    modules of ``plain`` (the ``no_nag`` forward's count) that stay at one row, the double blocks' scaled to the full
    depth."""
    scale = CONFIGS[name]["num_layers"] / model.config.num_layers
    return round(cfg.flops - sum(f * (scale if ".transformer_blocks." in m else 1)
                                 for m, f in plain.by_module.items() if _ONE_ROW.fullmatch(m)))
