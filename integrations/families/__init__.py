"""The model families: one module each, holding only that family's model knowledge (docs/adding-a-family.md).

Each module builds a ``Family`` (``..family``) and registers it. ``load_all`` imports them in order; a family whose
diffusers classes this release lacks is recorded as unavailable (``registry.unavailable``) instead of failing the
import, so ``apply_nag`` can say which diffusers it needs.
"""

from __future__ import annotations

import importlib

from ..registry import register_unavailable

# Module name -> what it covers. Order matters only where a family imports another's public names.
FAMILIES = {
    "flux": "FLUX.1, Kontext, Fill, Control",
    "chroma": "Chroma",
    "flux2": "FLUX.2 [dev] / [klein]",
    "zimage": "Z-Image",
    "sd3": "SD3 / SD3.5",
    "qwenimage": "Qwen-Image",
    "hidream": "HiDream-I1",
    "wan": "Wan 2.1 / 2.2",
    "sdxl": "SDXL",
    "ltx": "LTX-Video",
    "ltx2": "LTX-2 (2.0, 2.3, 2.5)",
    "sana": "Sana, Sana-Sprint, Sana-Video",
    "qwenimage21": "Qwen-Image 2.1",
    "hunyuanvideo15": "HunyuanVideo 1.5",
    "kandinsky6": "Kandinsky 6",
    "krea2": "Krea 2 (Krea2Transformer2DModel)",
    "wananimate2": "Wan Animate 2 (WanAnimate2Transformer3DModel; modular blocks)",
    "flux3": "FLUX.3 (Flux3Transformer2DModel; modular blocks)",
    "minimax_h3": "MiniMax-H3 (MiniMaxH3Transformer3DModel; modular blocks)",
}


def _from_diffusers(err: ImportError) -> bool:
    return (err.name or "").split(".")[0] == "diffusers"


def load_all() -> None:
    for name, covers in FAMILIES.items():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as err:
            if not _from_diffusers(err):
                raise
            register_unavailable(covers, str(err))
