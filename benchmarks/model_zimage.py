"""The full-size Z-Image transformer on the meta device and one denoising step's inputs per variant, for FLOP
counting.

``build(name)`` returns the model (config as in the public ``transformer/config.json``, as known here) on the meta
device in bfloat16; ``step_inputs(model, variant, resolution, caption, negative)`` the arguments of one step's
transformer work: ``"no_nag"`` (one plain forward), ``"cfg"`` (conditional and unconditional rows batched, as the
pipelines do) or ``"nag"`` (one guided forward, the default path: the image shared; the model must be patched with
``apply_nag``). ``count(name, variant, resolution)`` returns TFLOP (by default on a model with one block per stack,
the block costs repeated to the full depth: exact, the blocks of a stack being identical, and quick); ``"nag_2b"``
is the authors'-style 2B layout for comparison (joined layers at two rows): the CFG count minus the parts that stay
at one row there (the x embedder, the noise refiner and the final layer), measured per module.

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
VARIANTS = ("no_nag", "cfg", "nag", "nag_2b")
_ONE_ROW = re.compile(r"ZImageTransformer2DModel\.(all_x_embedder\.[^.]+|noise_refiner\.\d+|all_final_layer\.[^.]+)")


_STACKS = {"noise_refiner": "n_refiner_layers", "context_refiner": "n_refiner_layers", "layers": "n_layers"}


def build(name: str = "z-image-turbo", shallow: bool = False) -> torch.nn.Module:
    """The model on meta; ``shallow``: one block per stack (``count`` scales its block costs to the full depth:
    exact, the blocks of a stack being identical, and much quicker to count)."""
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


def _counted(model, kw, name: str) -> dict:
    """Per-module FLOPs of one forward, the blocks of a shallower ``model`` repeated up to ``name``'s depth."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**kw)
    counts = {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    for stack, key in _STACKS.items():
        missing = CONFIGS[name][key] - model.config[key]
        counts["Global"] += missing * counts.get(f"{root}.{stack}.0", 0)
    return counts


def count(name: str, variant: str, resolution: int = 1024, model=None, caption: int = TEXT_TOKENS,
          negative: int | None = None) -> float:
    """TFLOP of one step of ``name`` at ``resolution``^2 for ``variant`` (a matching ``model`` may be passed in)."""
    from nag_kernels.integrations import apply_nag, remove_nag

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model = build(name, shallow=True) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    if variant != "nag_2b":
        return _counted(model, step_inputs(model, variant, resolution, caption, negative), name)["Global"] / 1e12
    cfg = _counted(model, step_inputs(model, "cfg", resolution, caption), name)["Global"]
    plain = _counted(model, step_inputs(model, "no_nag", resolution, caption), name)
    scale = CONFIGS[name]["n_refiner_layers"] / model.config.n_refiner_layers  # the noise refiner, to full depth
    one_row = sum(f * (scale if ".noise_refiner." in m else 1) for m, f in plain.items() if _ONE_ROW.fullmatch(m))
    return (cfg - one_row) / 1e12
