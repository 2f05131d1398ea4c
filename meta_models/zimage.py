"""The full-size Z-Image transformer on the meta device and one denoising step's inputs per variant, for FLOP
counting.

``build(name)`` returns the model (config as in the public ``transformer/config.json``, as known here) on the meta
device in bfloat16; ``step_inputs(model, variant, resolution, caption, negative)`` the arguments of one step's
transformer work: ``"no_nag"`` (one plain forward), ``"cfg"`` (conditional and unconditional rows batched, as the
pipelines do) or ``"nag"`` (one guided forward, the default path: the image shared; the model must be patched with
``apply_nag``). ``build(name, shallow=True)`` has one block per stack; ``repeat(name, model)`` is what
``meta_models.count.count`` needs to count it at the full depth (exact, the blocks of a stack being identical, and
quick). ``nag_2b(name, model, cfg, plain)`` derives the authors'-style 2B layout for comparison (joined layers at two
rows) from the counts of the ``cfg`` and ``no_nag`` forwards: the CFG count minus the parts that stay at one row there
(the x embedder, the noise refiner and the final layer), measured per module.

Caption lengths: Z-Image's pipelines keep only a prompt's real tokens (up to ``max_sequence_length=512``) and the
model pads each caption to a multiple of 32, so the text length depends on the prompt; ``TEXT_TOKENS`` (512, the
pipelines' maximum) is the bucket the target is checked at, with the NAG negative as long as the prompt.
"""

from __future__ import annotations

import re

import torch

CONFIGS = {
    "z-image-turbo": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    ),
}
TEXT_TOKENS = 512
VARIANTS = ("no_nag", "cfg", "nag", "nag_2b")  # nag_2b: derived from the cfg and no_nag counts
_ONE_ROW = re.compile(r"ZImageTransformer2DModel\.(all_x_embedder\.[^.]+|noise_refiner\.\d+|all_final_layer\.[^.]+)")

_STACKS = {"noise_refiner": "n_refiner_layers", "context_refiner": "n_refiner_layers", "layers": "n_layers"}


def build(name: str = "z-image-turbo", shallow: bool = False) -> torch.nn.Module:
    """The model on meta; ``shallow``: one block per stack (``repeat`` counts it at the full depth)."""
    from diffusers import ZImageTransformer2DModel

    config = {**CONFIGS[name], **({"n_layers": 1, "n_refiner_layers": 1} if shallow else {})}
    with torch.device("meta"):
        return ZImageTransformer2DModel(**config).to(torch.bfloat16).eval()


def step_inputs(model, variant: str, resolution: int = 1024, caption: int = TEXT_TOKENS,
                negative: int | None = None) -> dict:
    """``x``, ``t``, ``cap_feats`` of one step at ``resolution``^2 (VAE 8x: ``[16, 1, r/8, r/8]`` latents)."""
    if variant not in ("no_nag", "cfg", "nag"):
        raise ValueError(f"variant must be one of no_nag, cfg, nag, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    images = 2 if variant == "cfg" else 1
    lengths = {"no_nag": [caption], "cfg": [caption, caption], "nag": [caption, negative or caption]}[variant]
    side = resolution // 8
    return dict(
        x=[torch.empty(model.config.in_channels, 1, side, side, device=meta, dtype=dtype) for _ in range(images)],
        t=torch.empty(images, device=meta, dtype=dtype),
        cap_feats=[torch.empty(n, model.config.cap_feat_dim, device=meta, dtype=dtype) for n in lengths],
        return_dict=False,
    )


def repeat(name: str, model: torch.nn.Module) -> dict[str, int]:
    """``count``'s ``repeat`` for ``model`` standing for ``name``: each stack's first block counted once more per
    block ``model`` lacks (nothing for the full-depth model)."""
    root = type(model).__name__
    return {f"{root}.{stack}.0": CONFIGS[name][key] - model.config[key] for stack, key in _STACKS.items()}


def nag_2b(name: str, model: torch.nn.Module, cfg, plain) -> int:
    """FLOPs of the authors'-style 2B layout: ``cfg`` (the ``cfg`` forward's count, at the full depth) minus the
    modules of ``plain`` (the ``no_nag`` forward's count) that stay at one row, the noise refiner's scaled to the full
    depth."""
    scale = CONFIGS[name]["n_refiner_layers"] / model.config.n_refiner_layers
    return round(cfg.flops - sum(f * (scale if ".noise_refiner." in m else 1)
                                 for m, f in plain.by_module.items() if _ONE_ROW.fullmatch(m)))
