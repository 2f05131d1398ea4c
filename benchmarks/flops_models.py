"""The flops suite's model registry: one entry per model configuration it counts.

An entry says what the configuration is (its name in the table, size, token counts), how to build the full-size
model on the meta device (no memory, no weights), how to build one step's inputs for each variant, which variants
the table shows for it and the target ratios its issues set. The families' meta builders
(``meta_models/<family>.py``: configs, ``build``, ``step_inputs(model, variant, resolution)``; a family still being
added: ``benchmarks/model_<family>.py``) are adapted here; the suite's loop does not change when a family is added.

``step_inputs(model, batch)`` returns the keyword arguments of every forward one step of a variant makes:
``no_nag`` one plain forward at batch ``B``; ``cfg`` the two passes of true CFG (two forwards, or one forward at
``2B`` rows where the family's pipelines batch it: the same FLOPs); ``nag`` the guided forward (``2B`` text rows,
positive then NAG-negative, and ``B`` latent rows, as a NAG-patched model takes them).

Variants (the rows of the table):

- ``no_nag``, ``cfg``: the forwards above, unpatched;
- ``nag_exact``, ``nag_fast`` (FLUX.1, the one family whose two modes compute different things): the ``nag``
  forward with ``apply_nag(mode=...)``;
- ``nag``: the ``nag`` forward with the family's default mode: the families with one computation (Wan, SDXL,
  LTX-Video, SD3.5, Qwen-Image: exact mode, the only one) and the shared-image-stream path of FLUX.2, Z-Image and
  Chroma (their ``exact`` and ``fast`` both name it);
- derived variants (``nag_2b``: the authors'-style 2B layout of FLUX.2 / Z-Image, for comparison), derived from the
  counts of the ``cfg`` and ``no_nag`` forwards by the family's ``nag_2b`` (``meta_models/flux2.py`` /
  ``meta_models/zimage.py``: the CFG count minus the parts that stay at one row), on the same full-depth model.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from meta_models import chroma as model_chroma
from meta_models import flux as model_flux
from meta_models import flux2 as model_flux2
from meta_models import flux3 as model_flux3
from meta_models import hidream as model_hidream
from meta_models import hunyuanvideo15 as model_hunyuanvideo15

# Families still being added keep their builders in benchmarks/ until they move to meta_models/.
from meta_models import kandinsky6 as model_kandinsky6
from meta_models import krea2 as model_krea2
from meta_models import ltx as model_ltx
from meta_models import ltx2 as model_ltx2
from meta_models import minimax_h3 as model_minimax_h3
from meta_models import qwenimage as model_qwenimage
from meta_models import qwenimage21 as model_qwenimage21
from meta_models import sana as model_sana
from meta_models import sd3 as model_sd3
from meta_models import sdxl as model_sdxl
from meta_models import wan as model_wan
from meta_models import wananimate2 as model_wananimate2
from meta_models import zimage as model_zimage
from meta_models.count import Counted, count
from meta_models.flux import FLUX1_TEXT_TOKENS, FLUX_TINY_TEXT_TOKENS

META = torch.device("meta")
DTYPE = torch.bfloat16

FLUX1_VARIANTS = ("no_nag", "cfg", "nag_exact", "nag_fast")
ONE_MODE = ("no_nag", "cfg", "nag")
WITH_2B = ("no_nag", "cfg", "nag", "nag_2b")


@dataclass(frozen=True)
class Target:
    """A NAG variant's most FLOPs relative to no NAG: ``max_ratio``, or the ratio of another entry's row (``like``:
    ``(key, variant)``, taken from the same run; ``max_ratio`` is the fallback when that row is not in the run)."""

    max_ratio: float
    label: str
    like: tuple[str, str] | None = None


@dataclass(frozen=True)
class FlopsModel:
    key: str  # the --models name
    config: str  # the table's config column
    resolution: int | str  # a square image's side, or the family's resolution name ("720p", "704x480x161")
    image_tokens: int  # image / video tokens (SDXL: latent positions)
    text_tokens: int
    build: Callable[[], torch.nn.Module]  # the full-size model on the meta device
    step_inputs: Callable[[torch.nn.Module, int], dict[str, list[dict]]]  # (model, batch) -> {variant: [kwargs]}
    variants: tuple[str, ...] = FLUX1_VARIANTS
    # derived variants: (model, batch) -> one step's count, derived from the counts of other forwards
    derived: Mapping[str, Callable[[torch.nn.Module, int], Counted]] = field(default_factory=dict)
    targets: Mapping[str, Target] = field(default_factory=dict)  # variant -> its target
    size: str = ""  # the table's size label ("" = f"{resolution}^2")
    tokens: str = ""  # the table's token label ("" = f"{image_tokens}+{text_tokens}")
    toy: bool = False  # a small stand-in for tests (--quick), not a real model

    @property
    def size_label(self) -> str:
        return self.size or f"{self.resolution}^2"

    @property
    def tokens_label(self) -> str:
        return self.tokens or f"{self.image_tokens}+{self.text_tokens}"


def _batched(kw: dict, batch: int, unbatched: tuple[str, ...] = ("img_ids", "txt_ids")) -> dict:
    """``kw`` (a builder's batch-1 inputs) with every row repeated ``batch`` times in place (``[pos, neg]`` ->
    ``[pos x B, neg x B]``): tensors along dim 0, per-sample lists (Z-Image's ``x`` / ``cap_feats``, Qwen-Image's
    ``img_shapes``) element by element; position ids and scalars as they are."""
    if batch == 1:
        return kw

    def rows(key, v):
        if key in unbatched:
            return v
        if isinstance(v, torch.Tensor):
            return v.repeat_interleave(batch, dim=0)
        if isinstance(v, list):
            return [e for e in v for _ in range(batch)]
        if isinstance(v, dict):
            return {k: rows(k, e) for k, e in v.items()}
        return v

    return {k: rows(k, v) for k, v in kw.items()}


# --- FLUX.1 (meta_models.flux: the committed FLUX.1 figures are reproduced exactly) --------------------------------


@functools.cache
def _flux_meta(config_name: str) -> torch.nn.Module:
    """One meta-device FluxTransformer2DModel per config, shared by that config's resolutions."""
    return model_flux.build(config_name, DTYPE)


def _flux_step_inputs(resolution: int, text_tokens: int, model, batch: int) -> dict[str, list]:
    pos = model_flux.step_inputs(model, "no_nag", resolution, text_tokens, batch)
    return {"no_nag": [pos], "cfg": [pos, pos], "nag": [model_flux.step_inputs(model, "nag", resolution, text_tokens,
                                                                               batch)]}


def flux(key: str, config_name: str, resolution: int, text_tokens: int, toy: bool = False, **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config=config_name, resolution=resolution, image_tokens=model_flux.image_tokens(resolution),
        text_tokens=text_tokens, build=functools.partial(_flux_meta, config_name),
        step_inputs=functools.partial(_flux_step_inputs, resolution, text_tokens), toy=toy, **kw,
    )


# --- the other families: their builders' models and inputs -----------------------------------------------------


@functools.cache
def _built(family: str, name: str) -> torch.nn.Module:
    """One meta model per (family, config), shared by that config's entries (Wan 14B 480p / 720p, Qwen-Image)."""
    builders = {
        "wan": model_wan.build, "sdxl": model_sdxl.build, "ltx": model_ltx.build, "sd3": model_sd3.build,
        "qwenimage": model_qwenimage.build, "chroma": model_chroma.build, "flux2": model_flux2.build,
        "zimage": model_zimage.build,
    }
    return builders[family](name)


def _wan_inputs(name: str, resolution: str, model, batch: int) -> dict[str, list]:
    # model_wan's "cfg" is one forward at 2 video rows: the FLOPs of Wan's two calls
    return {v: [_batched(model_wan.step_inputs(model, v, resolution, name), batch)] for v in ("no_nag", "cfg", "nag")}


def _sdxl_inputs(resolution: str, model, batch: int) -> dict[str, list]:
    return {v: [_batched(model_sdxl.step_inputs(model, v, resolution), batch)] for v in ("no_nag", "cfg", "nag")}


def _ltx_inputs(resolution: str, model, batch: int) -> dict[str, list]:
    return {v: [_batched(model_ltx.step_inputs(model, v, resolution), batch)] for v in ("no_nag", "cfg", "nag")}


def _sd3_inputs(resolution: int, model, batch: int) -> dict[str, list]:
    # SD3 pipelines batch CFG: one forward at 2 rows
    kw = {v: _batched(model_sd3.step_inputs(model, v, resolution), batch) for v in ("plain", "cfg", "nag")}
    return {"no_nag": [kw["plain"]], "cfg": [kw["cfg"]], "nag": [kw["nag"]]}


def _qwenimage_inputs(resolution: int, text_tokens: int, model, batch: int) -> dict[str, list]:
    # Qwen-Image's true CFG is a second plain call (model_qwenimage.CALLS["cfg"] == 2)
    plain = _batched(model_qwenimage.step_inputs(model, "plain", resolution, text_tokens), batch)
    nag = _batched(model_qwenimage.step_inputs(model, "nag", resolution, text_tokens), batch)
    return {"no_nag": [plain], "cfg": [plain] * model_qwenimage.CALLS["cfg"], "nag": [nag]}


def _chroma_inputs(resolution: int, text_tokens: int, model, batch: int) -> dict[str, list]:
    # Chroma's CFG: two plain calls
    plain = _batched(model_chroma.step_inputs(model, "plain", resolution, text_tokens), batch)
    nag = _batched(model_chroma.step_inputs(model, "nag", resolution, text_tokens), batch)
    return {"no_nag": [plain], "cfg": [plain, plain], "nag": [nag]}


def _flux2_inputs(resolution: int, text_tokens: int, model, batch: int) -> dict[str, list]:
    return {v: [_batched(model_flux2.step_inputs(model, v, resolution, text_tokens), batch)]
            for v in ("no_nag", "cfg", "nag")}


def _zimage_inputs(resolution: int, caption: int, model, batch: int) -> dict[str, list]:
    return {v: [_batched(model_zimage.step_inputs(model, v, resolution, caption, caption), batch)]
            for v in ("no_nag", "cfg", "nag")}


def _batch_one(batch: int, family: str) -> None:
    if batch != 1:
        from .harness import Skip

        raise Skip(f"{family}.nag_2b derives the 2B layout at batch 1 only")


def _derived_2b(family, inputs, name: str, model, batch: int) -> Counted:
    """The 2B layout's count: ``family.nag_2b`` of the ``cfg`` and ``no_nag`` forwards' counts (``inputs(model,
    variant)``: one forward's arguments)."""
    _batch_one(batch, family.__name__.rsplit(".", 1)[-1])
    cfg, plain = (count(lambda kw=inputs(model, v): model(**kw), family.repeat(name, model)) for v in ("cfg", "no_nag"))
    return dataclasses.replace(cfg, flops=family.nag_2b(name, model, cfg, plain), by_op={}, by_module={})


def _flux2_2b(name: str, resolution: int, text_tokens: int, model, batch: int) -> Counted:
    return _derived_2b(model_flux2, lambda m, v: model_flux2.step_inputs(m, v, resolution, text_tokens), name, model,
                       batch)


def _zimage_2b(name: str, resolution: int, caption: int, model, batch: int) -> Counted:
    return _derived_2b(model_zimage, lambda m, v: model_zimage.step_inputs(m, v, resolution, caption, caption), name,
                       model, batch)


def wan(key: str, label: str, name: str, resolution: str, **kw) -> FlopsModel:
    _, frames, height, width = model_wan.latent_shape(name, resolution)
    spatial = 16 if name == "wan2.2-ti2v-5b" else 8
    return FlopsModel(
        key=key, config=label, resolution=resolution, image_tokens=model_wan.video_tokens(name, resolution),
        text_tokens=model_wan.TEXT_TOKENS, build=functools.partial(_built, "wan", name),
        step_inputs=functools.partial(_wan_inputs, name, resolution), variants=ONE_MODE,
        size=f"{width * spatial}x{height * spatial}x{model_wan.FRAMES}", **kw,
    )


def sdxl(key: str, resolution: str = "1024", name: str = "sdxl-base-1.0") -> FlopsModel:
    side = model_sdxl.RESOLUTIONS[resolution] // 8
    return FlopsModel(
        key=key, config="SDXL base 1.0", resolution=model_sdxl.RESOLUTIONS[resolution], image_tokens=side * side,
        text_tokens=model_sdxl.TEXT_TOKENS, build=functools.partial(_built, "sdxl", name),
        step_inputs=functools.partial(_sdxl_inputs, resolution), variants=ONE_MODE,
        tokens=f"{side}^2 latent+{model_sdxl.TEXT_TOKENS}",
    )


def ltx(key: str, resolution: str = "704x480x161", name: str = "ltx-video-2b") -> FlopsModel:
    frames, height, width = model_ltx.latent_grid(resolution)
    return FlopsModel(
        key=key, config="LTX-Video 2B", resolution=resolution, image_tokens=frames * height * width,
        text_tokens=model_ltx.TEXT_TOKENS, build=functools.partial(_built, "ltx", name),
        step_inputs=functools.partial(_ltx_inputs, resolution), variants=ONE_MODE, size=resolution,
    )


@functools.cache
def _ltx2_meta(name: str) -> torch.nn.Module:
    return model_ltx2.build(name)


def ltx2(key: str, name: str, resolution: str, max_ratio: float) -> FlopsModel:
    video, audio = model_ltx2.video_tokens(resolution), model_ltx2.audio_tokens(resolution)
    return FlopsModel(
        key=key, config=model_ltx2.LABELS[name], resolution=resolution, image_tokens=video,
        text_tokens=model_ltx2.TEXT_TOKENS, build=functools.partial(_ltx2_meta, name),
        step_inputs=functools.partial(model_ltx2.flops_inputs, name, resolution), variants=ONE_MODE, size=resolution,
        tokens=f"{video}+{audio} audio+{model_ltx2.TEXT_TOKENS}", targets={"nag": Target(max_ratio, f"<= {max_ratio}x")},
    )


def sd3(key: str, label: str, name: str, resolution: int, **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config=label, resolution=resolution, image_tokens=(resolution // 16) ** 2,
        text_tokens=model_sd3.TEXT_TOKENS, build=functools.partial(_built, "sd3", name),
        step_inputs=functools.partial(_sd3_inputs, resolution), variants=ONE_MODE, **kw,
    )


def qwenimage(key: str, resolution: int, text_tokens: int = 256, **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config="Qwen-Image", resolution=resolution, image_tokens=(resolution // 16) ** 2,
        text_tokens=text_tokens, build=functools.partial(_built, "qwenimage", "qwen-image"),
        step_inputs=functools.partial(_qwenimage_inputs, resolution, text_tokens), variants=ONE_MODE, **kw,
    )


def chroma(key: str, resolution: int, text_tokens: int = 512, **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config="Chroma1-HD", resolution=resolution, image_tokens=(resolution // 16) ** 2,
        text_tokens=text_tokens, build=functools.partial(_built, "chroma", "chroma1-hd"),
        step_inputs=functools.partial(_chroma_inputs, resolution, text_tokens), variants=ONE_MODE, **kw,
    )


def flux2(key: str, label: str, name: str, resolution: int, text_tokens: int = model_flux2.TEXT_TOKENS,
          **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config=label, resolution=resolution, image_tokens=model_flux2.image_tokens(resolution),
        text_tokens=text_tokens, build=functools.partial(_built, "flux2", name),
        step_inputs=functools.partial(_flux2_inputs, resolution, text_tokens), variants=WITH_2B,
        derived={"nag_2b": functools.partial(_flux2_2b, name, resolution, text_tokens)}, **kw,
    )


def zimage(key: str, resolution: int, caption: int = model_zimage.TEXT_TOKENS, name: str = "z-image-turbo",
           **kw) -> FlopsModel:
    return FlopsModel(
        key=key, config="Z-Image-Turbo", resolution=resolution, image_tokens=(resolution // 16) ** 2,
        text_tokens=caption, build=functools.partial(_built, "zimage", name),
        step_inputs=functools.partial(_zimage_inputs, resolution, caption), variants=WITH_2B,
        derived={"nag_2b": functools.partial(_zimage_2b, name, resolution, caption)}, **kw,
    )


# FLUX.1 fast mode's ratio at 1024^2 as the flops suite counts it (84.135 / 74.385 TFLOP, docs/performance.md):
# Chroma's target when the flux1-1024 row is not in the same run.
FLUX1_FAST_1024_RATIO = 84135379992576 / 74384653418496
AT_MOST_1_15 = Target(1.15, "<= 1.15x")

def _with_cfg(step_inputs):
    """``step_inputs`` of a guidance-distilled model (no CFG pass of its own) with a ``cfg`` variant: two plain passes,
    what CFG would cost it, for the table's comparison."""

    def inputs(model, batch: int = 1) -> dict[str, list[dict]]:
        steps = step_inputs(model, batch)
        return {**steps, "cfg": steps.get("cfg") or 2 * steps["no_nag"]}

    return inputs


MODELS: dict[str, FlopsModel] = {
    m.key: m
    for m in [
        # FLUX.1-dev / -schnell (meta_models.flux.FLUX1), 512 T5 tokens.
        flux("flux1-1024", "FLUX.1", 1024, FLUX1_TEXT_TOKENS),
        flux("flux1-2048", "FLUX.1", 2048, FLUX1_TEXT_TOKENS),
        # Wan 2.1 T2V 14B, 81 frames, 512 UMT5 tokens; Wan 2.2 TI2V-5B at its 720p (1280x704: 16x VAE).
        wan("wan21-14b-480p", "Wan 2.1 T2V 14B", "wan2.1-t2v-14b", "480p"),
        wan("wan21-14b-720p", "Wan 2.1 T2V 14B", "wan2.1-t2v-14b", "720p",
            targets={"nag": Target(1.02, "<= 1.02x")}),
        wan("wan22-ti2v-5b-720p", "Wan 2.2 TI2V 5B", "wan2.2-ti2v-5b", "720p"),
        # SDXL base UNet, 77 CLIP tokens; the pipelines batch CFG.
        sdxl("sdxl-1024"),
        # LTX-Video 2B at the pipeline's default 704x480, 161 frames, 128 T5 tokens.
        ltx("ltx-video-704x480x161"),
        # SD3.5 Large / Medium, 77 CLIP + 256 T5 tokens.
        sd3("sd35-large-1024", "SD3.5 Large", "sd3.5-large", 1024, targets={"nag": AT_MOST_1_15}),
        sd3("sd35-medium-1024", "SD3.5 Medium", "sd3.5-medium", 1024),
        # Qwen-Image, 256 text tokens (model_qwenimage's default; each prompt has its own length).
        qwenimage("qwen-image-1024", 1024, targets={"nag": AT_MOST_1_15}),
        qwenimage("qwen-image-1328", 1328),
        # Chroma1-HD, 512 T5 tokens, text mask given: the shared image stream is its one NAG computation.
        chroma("chroma-1024", 1024, targets={"nag": Target(
            FLUX1_FAST_1024_RATIO, "<= FLUX.1 fast at 1024^2", like=("flux1-1024", "nag_fast"))}),
        # FLUX.2 [dev] and [klein] 4B / 9B, text padded to 512 tokens.
        flux2("flux2-dev-1024", "FLUX.2 [dev]", "flux2-dev", 1024, targets={"nag": AT_MOST_1_15}),
        flux2("flux2-klein-4b-1024", "FLUX.2 [klein] 4B", "flux2-klein-4b", 1024, targets={"nag": AT_MOST_1_15}),
        flux2("flux2-klein-9b-1024", "FLUX.2 [klein] 9B", "flux2-klein-9b", 1024, targets={"nag": AT_MOST_1_15}),
        # Z-Image-Turbo, captions at the pipelines' 512-token bucket (the NAG negative as long).
        zimage("z-image-1024", 1024, targets={"nag": AT_MOST_1_15}),
        # HiDream-I1 (Full / Dev / Fast share the transformer), 128 T5 + 128 + 128 Llama tokens in every block; the
        # pooled CLIP vector is in the modulation, so exact and fast mode compute different things (as on FLUX.1).
        FlopsModel(key="hidream-i1-1024", config="HiDream-I1", resolution=1024, image_tokens=(1024 // 16) ** 2,
                   text_tokens=model_hidream.TEXT_TOKENS, build=functools.cache(model_hidream.build),
                   step_inputs=model_hidream.flops_inputs, targets={"nag_fast": AT_MOST_1_15}),
        # Sana 1.6B at 1024^2 (1024 tokens) and Sana-Video 2B at 832x480, 81 frames (32760 tokens), 300 Gemma2 tokens;
        # the pipelines batch CFG (one forward at 2 rows).
        FlopsModel(key="sana-1600m-1024", config="Sana 1.6B", resolution=1024,
                   image_tokens=model_sana.tokens(model_sana.CONFIGS["sana-1600m"], "1024"),
                   text_tokens=model_sana.TEXT_TOKENS, build=functools.cache(functools.partial(model_sana.build,
                                                                                               "sana-1600m")),
                   step_inputs=functools.partial(model_sana.flops_inputs, "1024"), variants=ONE_MODE,
                   targets={"nag": Target(1.07, "<= 1.07x")}),
        FlopsModel(key="sana-video-2b-832x480x81", config="Sana-Video 2B", resolution="832x480x81",
                   image_tokens=model_sana.tokens(model_sana.CONFIGS["sana-video-2b"], "832x480x81"),
                   text_tokens=model_sana.TEXT_TOKENS, build=functools.cache(functools.partial(model_sana.build,
                                                                                               "sana-video-2b")),
                   step_inputs=functools.partial(model_sana.flops_inputs, "832x480x81"), variants=ONE_MODE,
                   size="832x480x81", targets={"nag": Target(1.02, "<= 1.02x")}),
        # Kandinsky 6.0 Pro (distill: diffusers' example checkpoint) at 864x480, 121 frames with audio (50220 video +
        # 218 audio tokens), 1024 Qwen2.5-VL tokens; CFG is two forwards.
        FlopsModel(key="kandinsky6-pro-864x480x121", config="Kandinsky 6.0 Pro", resolution="864x480x121",
                   image_tokens=model_kandinsky6.video_tokens(model_kandinsky6.PRO, "864x480x121"),
                   text_tokens=model_kandinsky6.TEXT_TOKENS, build=functools.cache(functools.partial(
                       model_kandinsky6.build, "kandinsky6-pro-distill")),
                   step_inputs=functools.partial(model_kandinsky6.flops_inputs, "864x480x121"), variants=ONE_MODE,
                   size="864x480x121", tokens="50220+218 audio+1024", targets={"nag": Target(1.02, "<= 1.02x")}),
        # HunyuanVideo 1.5 (8.3B) text-to-video at 720p (1280x720), 121 frames; 1000 Qwen2.5-VL + 256 ByT5 + 729 image
        # tokens in the text stream; the pipelines' guider runs CFG's two passes as two calls.
        FlopsModel(key="hunyuanvideo15-720p", config="HunyuanVideo 1.5", resolution="720p",
                   image_tokens=model_hunyuanvideo15.video_tokens("720p"), text_tokens=model_hunyuanvideo15.TEXT_TOKENS,
                   build=functools.cache(model_hunyuanvideo15.build),
                   step_inputs=functools.partial(model_hunyuanvideo15.flops_inputs, "720p"), variants=ONE_MODE,
                   size="1280x720x121", targets={"nag": Target(1.05, "<= 1.05x")}),
        # Qwen-Image 2.1 (QwenImage21Transformer2DModel's defaults in diffusers 0.42.1) at 1024^2, 256 text positions: a
        # full step (the KV cache's first); CFG is two forwards. KV-cached steps: model_qwenimage21.count(cached=True).
        FlopsModel(key="qwen-image-2.1-1024", config="Qwen-Image 2.1", resolution=1024,
                   image_tokens=model_qwenimage21.image_tokens(1024), text_tokens=model_qwenimage21.TEXT_TOKENS,
                   build=functools.cache(model_qwenimage21.build), variants=ONE_MODE, targets={"nag": AT_MOST_1_15},
                   step_inputs=functools.partial(model_qwenimage21.flops_inputs, 1024, model_qwenimage21.TEXT_TOKENS)),
        # LTX-2 19B and LTX-2.3 22B (video + audio streams, NAG in both text cross-attentions), 121 frames at 24 fps
        # (126 audio tokens), 1024 Gemma3 tokens through the connectors; the pipelines batch CFG (one forward, 2 rows).
        ltx2("ltx2-19b-768x512x121", "ltx-2-19b", "768x512x121", 1.05),
        ltx2("ltx2-19b-1920x1088x121", "ltx-2-19b", "1920x1088x121", 1.025),
        ltx2("ltx2.3-22b-768x512x121", "ltx-2.3-22b", "768x512x121", 1.05),
        ltx2("ltx2.3-22b-1920x1088x121", "ltx-2.3-22b", "1920x1088x121", 1.025),
        # Krea 2 (Krea2Transformer2DModel's defaults in diffusers 0.42.1) at 1024^2, 512 text tokens; CFG: two calls.
        FlopsModel(key="krea2-1024", config="Krea 2", resolution=1024, image_tokens=model_krea2.image_tokens(1024),
                   text_tokens=model_krea2.TEXT_TOKENS, build=functools.cache(model_krea2.build),
                   step_inputs=functools.partial(model_krea2.flops_inputs, 1024, model_krea2.TEXT_TOKENS),
                   variants=ONE_MODE, targets={"nag": AT_MOST_1_15}),
        # FLUX.3 (Flux3Transformer2DModel's defaults in diffusers 0.42.1) at 1024^2, a 480-token text window; CFG: two
        # calls.
        FlopsModel(key="flux3-1024", config="FLUX.3", resolution=1024, image_tokens=model_flux3.image_tokens(1024),
                   text_tokens=model_flux3.TEXT_TOKENS, build=functools.cache(model_flux3.build), variants=ONE_MODE,
                   targets={"nag": AT_MOST_1_15},
                   step_inputs=functools.partial(model_flux3.flops_inputs, 1024, model_flux3.TEXT_TOKENS)),
        # Wan Animate 2 14B at the blocks' default 800x640, 81 frames per segment (flex attention counted densely, as
        # FlopCounterMode counts flex).
        FlopsModel(key="wananimate2-14b-800x640x81", config="Wan Animate 2 14B", resolution="800x640x81",
                   image_tokens=model_wananimate2.video_tokens("800x640x81"), text_tokens=model_wananimate2.TEXT_TOKENS,
                   build=functools.cache(functools.partial(model_wananimate2.build, "wan-animate-2-14b")),
                   step_inputs=functools.partial(model_wananimate2.flops_inputs, "800x640x81"), variants=ONE_MODE,
                   targets={"nag": Target(1.02, "<= 1.02x")}),
        # MiniMax-H3 (MiniMaxH3Transformer3DModel's defaults in diffusers 0.42.1), t2va at 768x1344, 5 s (37 latent
        # frames x 1008 rows + 414 audio rows), a 512-token prompt; guidance-distilled: its "cfg" row is what two plain
        # passes would cost, for comparison.
        FlopsModel(key="minimax-h3-768x1344x120", config="MiniMax-H3", resolution="768x1344x120",
                   image_tokens=sum(model_minimax_h3.rows()), text_tokens=model_minimax_h3.TEXT_TOKENS,
                   build=functools.cache(functools.partial(model_minimax_h3.build, "minimax-h3")),
                   step_inputs=_with_cfg(model_minimax_h3.flops_inputs), variants=ONE_MODE,
                   targets={"nag": Target(1.10, "<= 1.10x")}),
        # The Flux-shaped toy (meta_models.flux.FLUX_TINY): seconds on any machine, for tests and --quick.
        flux("flux-tiny-256", "flux-tiny", 256, FLUX_TINY_TEXT_TOKENS, toy=True),
        flux("flux-tiny-512", "flux-tiny", 512, FLUX_TINY_TEXT_TOKENS, toy=True),
    ]
}


def selected(names: str | None, quick: bool) -> list[FlopsModel]:
    """``--models`` (comma list of keys), else every real model (``--quick``: every toy)."""
    if not names:
        return [m for m in MODELS.values() if m.toy == quick]
    out = []
    for name in names.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown flops model {name!r}; known: {', '.join(MODELS)}")
        out.append(MODELS[name])
    return out
