"""diffusers' own pipeline features on patched pipelines: the essential checks of diffusers' pipeline test modules
(which are not installed with the wheel), reproduced on the tiny offline pipelines of the other tests.

Called without NAG arguments a patched pipeline must be the stock pipeline bit for bit (every output type, tuple
outputs, ``num_images_per_prompt``, ``callback_on_step_end``, a prompt batch, a save/load round trip); with a NAG
negative the same features must run, a batch must equal its single-prompt calls, and a pipeline saved and loaded
again must give the same NAG output. The processor setters diffusers' tests use (``set_default_attn_processor``,
``enable_attention_slicing``, ``fuse_qkv_projections`` / ``unfuse_qkv_projections``) keep NAG working on SDXL and
SD3 (``integrations/processor_setters.py``), equal to the default/unfused NAG call; Wan's first-last-frame I2V
(two image-context rows per sample) is guided like the authors' layout.
"""

from __future__ import annotations

import json
import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    ZImagePipeline,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0

import flux_toy
import qwenimage_toy
import sd3_toy
import sdxl_toy
import wan_toy
import zimage_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS, NEGATIVES = ["a red cat", "a big dog"], ["blurry", "a dog!"]  # one token length each (no padding)


def _noise(*shape):
    def make(batch, seed=0):
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    return make


# family -> (pipeline builder, call arguments, initial latents of a batch, output types to check)
CASES = {
    "flux": (lambda: flux_toy.pipeline(FluxPipeline),
             dict(height=32, width=32, max_sequence_length=flux_toy.SEQ_LEN, guidance_scale=0.0),
             flux_toy.latents, ("pil", "np", "pt")),
    "sdxl": (sdxl_toy.pipeline, dict(height=sdxl_toy.SIZE, width=sdxl_toy.SIZE, guidance_scale=5.0),
             sdxl_toy.latents, ("pil", "np", "pt")),
    "sd3": (lambda: sd3_toy.pipeline(StableDiffusion3Pipeline),
            dict(height=32, width=32, max_sequence_length=sd3_toy.SEQ_LEN, guidance_scale=4.0),
            sd3_toy.latents, ("pil", "np", "pt")),
    "wan": (wan_toy.pipeline,
            dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES,
                 max_sequence_length=wan_toy.SEQ_LEN, guidance_scale=4.0),
            wan_toy.latents, ("np", "pt")),
    "qwenimage": (lambda: qwenimage_toy.pipeline(QwenImagePipeline), dict(height=32, width=32),
                  _noise(16, 16), ("pil", "np", "pt")),
    "zimage": (lambda: zimage_toy.pipeline(ZImagePipeline),
               dict(height=zimage_toy.SIZE, width=zimage_toy.SIZE, max_sequence_length=64),
               _noise(zimage_toy.LATENT_CHANNELS, zimage_toy.SIZE // 2, zimage_toy.SIZE // 2), ("pil", "np", "pt")),
}
STEPS = 2


def as_tensor(out) -> torch.Tensor:
    """The output tensor of a pipeline call, whatever its ``output_type`` / ``return_dict``."""
    if isinstance(out, tuple):
        out = out[0]
    elif hasattr(out, "frames") or hasattr(out, "images"):
        out = out.frames if hasattr(out, "frames") else out.images
    if isinstance(out, list):  # PIL images
        return torch.from_numpy(np.stack([np.asarray(image) for image in out]))
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


def variants(latents, output_types, per_prompt="num_images_per_prompt"):
    """Call arguments for each feature: name -> (prompt, arguments)."""
    calls = {
        "latent": ("a red cat", dict(latents=latents(1), output_type="latent")),
        "tuple": ("a red cat", dict(latents=latents(1), output_type="latent", return_dict=False)),
        "images-per-prompt": ("a red cat", dict(latents=latents(2), output_type="latent", **{per_prompt: 2})),
        "batch": (PROMPTS, dict(latents=latents(2), output_type="latent")),
        "callback": ("a red cat", dict(latents=latents(1), output_type="latent")),
    }
    for kind in output_types:
        calls[kind] = ("a red cat", dict(latents=latents(1), output_type=kind))
    return calls


def recording_callback(record: list):
    def callback(pipe, step, t, kwargs):
        record.append(kwargs["latents"].clone())
        return {"latents": kwargs["latents"] * 0.95}  # the pipeline goes on with what the callback returns

    return callback


def call(pipe, prompt, kw, name, **nag):
    record = []
    if name == "callback":
        kw = {**kw, "callback_on_step_end": recording_callback(record),
              "callback_on_step_end_tensor_inputs": ["latents"]}
    return as_tensor(pipe(prompt, num_inference_steps=STEPS, **kw, **nag)), record


@pytest.mark.parametrize("family", list(CASES))
def test_stock_features_are_bit_identical_without_nag_and_run_with_it(family):
    build, common, latents, output_types = CASES[family]
    pipe = build()
    calls = variants(latents, output_types, "num_videos_per_prompt" if family == "wan" else "num_images_per_prompt")
    stock = {name: call(pipe, prompt, {**common, **kw}, name) for name, (prompt, kw) in calls.items()}
    apply_nag(pipe, backend="torch")
    for name, (prompt, kw) in calls.items():
        out, record = call(pipe, prompt, {**common, **kw}, name)
        assert torch.equal(out, stock[name][0]), name
        assert len(record) == len(stock[name][1]) and all(map(torch.equal, record, stock[name][1])), name

    nag = {}
    for name, (prompt, kw) in calls.items():
        negative = NEGATIVES if name == "batch" else "blurry"
        nag[name], record = call(pipe, prompt, {**common, **kw}, name, nag_negative_prompt=negative)
        assert nag[name].shape == stock[name][0].shape and torch.isfinite(nag[name].double()).all(), name
        if name == "callback":  # the callback sees the B latent rows of every step, and what it returns is used
            assert len(record) == STEPS and all(r.shape == latents(1).shape for r in record)
            assert (nag[name] - nag["latent"]).abs().max() > 1e-6
    assert (nag["latent"] - stock["latent"][0]).abs().max() > 1e-6  # NAG acts
    assert torch.equal(nag["tuple"], nag["latent"])
    # batch identity: each row of a NAG batch is its single-prompt NAG call
    common_latents = latents(2)
    for i in range(2):
        one, _ = call(pipe, PROMPTS[i], {**common, "latents": common_latents[i : i + 1], "output_type": "latent"},
                      "batch", nag_negative_prompt=NEGATIVES[i])
        torch.testing.assert_close(nag["batch"][i : i + 1], one, rtol=0, atol=1e-10)


def _files(root) -> dict:
    """The saved files but the tokenizers' (a call leaves its padding settings in a fast tokenizer's state)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.relative_to(root).parts[0].startswith("tokenizer")}


@pytest.mark.parametrize("family", list(CASES))
def test_save_and_load_round_trip_of_a_patched_pipeline(family, tmp_path):
    build, common, latents, _ = CASES[family]
    pipe = build()
    pipe.save_pretrained(tmp_path / "stock")
    apply_nag(pipe, backend="torch")
    kw = {**common, "latents": latents(1), "output_type": "latent"}
    guided, _ = call(pipe, "a red cat", kw, "latent", nag_negative_prompt="blurry")
    pipe.save_pretrained(tmp_path / "patched")
    assert _files(tmp_path / "patched") == _files(tmp_path / "stock")  # what the stock pipeline writes, byte for byte
    stock_class = type(pipe).__bases__[0]
    assert json.loads((tmp_path / "patched" / "model_index.json").read_text())["_class_name"] == stock_class.__name__
    loaded = stock_class.from_pretrained(tmp_path / "patched", torch_dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is stock_class
    plain, _ = call(loaded, "a red cat", kw, "latent")
    apply_nag(loaded, backend="torch")
    assert torch.equal(call(loaded, "a red cat", kw, "latent")[0], plain)
    out, _ = call(loaded, "a red cat", kw, "latent", nag_negative_prompt="blurry")
    # from_pretrained keeps Wan's _keep_in_fp32_modules in float32 (the stock load does the same)
    torch.testing.assert_close(out, guided, rtol=0, atol=1e-5 if family == "wan" else 0)


# --- SDXL: the UNet's processor setters ---------------------------------------------------------------------------

SDXL_KW = dict(height=sdxl_toy.SIZE, width=sdxl_toy.SIZE, guidance_scale=5.0, output_type="latent",
               num_inference_steps=STEPS)


def _sdxl(pipe, **nag):
    return pipe("a red cat", latents=sdxl_toy.latents(1), **SDXL_KW, **nag).images


def _inner_kinds(model) -> set:
    return {type(getattr(p, "inner", p)).__name__ for p in model.attn_processors.values()}


def test_sdxl_processor_setters_keep_the_stock_output_and_nag():
    stock, pipe = sdxl_toy.pipeline(), apply_nag(sdxl_toy.pipeline(), backend="torch")
    guided = _sdxl(pipe, nag_negative_prompt="blurry")
    setters = [
        ("set_default_attn_processor", lambda p: p.unet.set_default_attn_processor(), "AttnProcessor"),
        ("attention slicing", lambda p: p.enable_attention_slicing(1), "SlicedAttnProcessor"),
        ("slicing off", lambda p: p.disable_attention_slicing(), "AttnProcessor2_0"),
        ("fused", lambda p: p.fuse_qkv_projections(), "FusedAttnProcessor2_0"),
    ]
    for name, setter, kind in setters:
        setter(stock)
        setter(pipe)
        assert _inner_kinds(pipe.unet) == {kind} == _inner_kinds(stock.unet), name
        assert all(type(p).__name__ == "NAGAttnProcessor" for p in pipe.unet.attn_processors.values()), name
        assert torch.equal(_sdxl(pipe), _sdxl(stock)), name  # no NAG: the stock processor, bit for bit
        torch.testing.assert_close(_sdxl(pipe, nag_negative_prompt="blurry"), guided, rtol=0, atol=1e-10)

    # fused: the guided cross-attention projects K and V through the fused to_kv
    used = []
    attn2 = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    handle = attn2.to_kv.register_forward_hook(lambda m, a, o: used.append(a[0].shape[0]))
    _sdxl(pipe, nag_negative_prompt="blurry")
    handle.remove()
    assert 3 in used  # batched CFG: [uncond; cond; NAG negative] text rows
    stock.unfuse_qkv_projections()
    pipe.unfuse_qkv_projections()
    assert _inner_kinds(pipe.unet) == {"AttnProcessor2_0"}
    remove_nag(pipe)  # leaves the stock processors set last
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert torch.equal(_sdxl(pipe), _sdxl(stock))


def test_sdxl_fused_before_apply_nag_and_a_processor_set_on_one_module_is_refused_under_batched_cfg():
    pipe = sdxl_toy.pipeline()
    pipe.fuse_qkv_projections()
    apply_nag(pipe, backend="torch")  # wraps the fused stock processors too
    unfused = apply_nag(sdxl_toy.pipeline(), backend="torch")
    torch.testing.assert_close(_sdxl(pipe, nag_negative_prompt="blurry"), _sdxl(unfused, nag_negative_prompt="blurry"),
                               rtol=0, atol=1e-10)
    name = next(n for n, m in pipe.unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention)
    pipe.unet.get_submodule(name).set_processor(AttnProcessor2_0())  # one module, not through the UNet's setters
    with pytest.raises(RuntimeError, match=f"{name} uses AttnProcessor2_0"):  # refused before diffusers runs
        _sdxl(pipe, nag_negative_prompt="blurry")
    assert torch.equal(_sdxl(pipe), _sdxl(unfused))  # plain calls are untouched (the processors compute the same)
    apply_nag(pipe, backend="torch")
    torch.testing.assert_close(_sdxl(pipe, nag_negative_prompt="blurry"), _sdxl(unfused, nag_negative_prompt="blurry"),
                               rtol=0, atol=1e-10)


# --- SD3: fused projections ---------------------------------------------------------------------------------------

def _sd3_pipeline():
    pipe = sd3_toy.pipeline(StableDiffusion3Pipeline)
    # SD3 (not 3.5): diffusers' fused joint processor has no QK norms and no image-only attention
    pipe.transformer = sd3_toy.transformer(dual=(), qk_norm=None).double()
    return pipe


def _sd3(pipe, guidance=4.0, **nag):
    return pipe("a red cat", latents=sd3_toy.latents(1), height=32, width=32, num_inference_steps=STEPS,
                max_sequence_length=sd3_toy.SEQ_LEN, guidance_scale=guidance, output_type="latent", **nag).images


@pytest.mark.parametrize("guidance", [4.0, 0.0], ids=["batched-cfg", "no-cfg"])
def test_sd3_fused_projections_keep_the_stock_output_and_equal_the_unfused_nag_call(guidance):
    stock, pipe = _sd3_pipeline(), apply_nag(_sd3_pipeline(), backend="torch")
    unfused = _sd3(pipe, guidance, nag_negative_prompt="blurry")
    stock.transformer.fuse_qkv_projections()
    pipe.transformer.fuse_qkv_projections()
    assert _inner_kinds(pipe.transformer) == {"FusedJointAttnProcessor2_0"}
    assert torch.equal(_sd3(pipe, guidance), _sd3(stock, guidance))
    used = []
    attn = pipe.transformer.transformer_blocks[0].attn
    hooks = [proj.register_forward_hook(lambda m, a, o: used.append(a[0].shape[0]))
             for proj in (attn.to_qkv, attn.to_added_qkv)]
    fused = _sd3(pipe, guidance, nag_negative_prompt="blurry")
    for hook in hooks:
        hook.remove()
    assert used and max(used) == (3 if guidance > 1 else 2)  # the text rows with the NAG negative's
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-10)
    pipe.transformer.unfuse_qkv_projections()
    remove_nag(pipe)
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {JointAttnProcessor2_0}


# --- Wan: first-last-frame image-to-video -------------------------------------------------------------------------

@pytest.fixture
def _no_ftfy(monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (wan_toy.SIZE, wan_toy.SIZE, 3), dtype=np.uint8))


def _flf2v():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(4)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=20, intermediate_size=37, num_attention_heads=4,
                                              num_hidden_layers=2, image_size=32, patch_size=8)).eval()
    parts = wan_toy.components()
    parts.pop("transformer")
    # 17 CLIP tokens per frame: the embedder joins the first and the last frame's rows (pos_embed over 2 x 17)
    model = wan_toy.transformer(in_channels=36, image_dim=20, added_kv_proj_dim=24, pos_embed_seq_len=34)
    with torch.no_grad():
        model.condition_embedder.image_embedder.pos_embed.normal_(0, 0.5)
    pipe = WanImageToVideoPipeline(**parts, transformer=model, image_encoder=vision,
                                   image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=torch.float64)


@pytest.mark.usefixtures("_no_ftfy")
def test_wan_first_last_frame_i2v_matches_the_authors_layout():
    from test_wan_pipeline import reference

    pipe = _flf2v()
    kw = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES, num_inference_steps=STEPS,
              output_type="latent", image=_image(1), last_image=_image(2), max_sequence_length=512,
              guidance_scale=1.0, prompt="a red cat")
    with torch.no_grad():
        positive, negative = (pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=512)[0]
                              for p in ("a red cat", "blurry dog"))
    expected = reference(pipe, positive, negative)(generator=torch.Generator().manual_seed(0), **kw).frames
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    apply_nag(pipe, backend="torch")
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).frames, plain)
    out = pipe(nag_negative_prompt="blurry dog", generator=torch.Generator().manual_seed(0), **kw).frames
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert (out - plain).abs().max() > 1e-5
    # NAG off in the later steps: those forwards get the stock image context (2 rows per sample)
    pipe(nag_negative_prompt="blurry dog", nag_end=0.5, generator=torch.Generator().manual_seed(0),
         **{**kw, "num_inference_steps": 3})


def test_wan_first_last_frame_transformer_takes_the_image_context_per_sample_or_for_both_branches():
    model = apply_nag(_flf2v().transformer, backend="torch")
    g = torch.Generator().manual_seed(3)
    batch = 2
    kw = dict(hidden_states=torch.randn(batch, 36, 2, 4, 4, generator=g, dtype=torch.float64),
              timestep=torch.tensor([900.0, 900.0], dtype=torch.float64),
              encoder_hidden_states=torch.randn(2 * batch, 512, wan_toy.TEXT_DIM, generator=g, dtype=torch.float64),
              encoder_hidden_states_image=torch.randn(2 * batch, 17, 20, generator=g, dtype=torch.float64),
              return_dict=False)  # 2 rows per sample (first, last frame) for 2 samples; text 2B: guided
    with torch.no_grad():
        out = model(**kw)[0]
        both = model(**{**kw, "encoder_hidden_states_image": kw["encoder_hidden_states_image"].repeat(2, 1, 1)})[0]
        assert out.shape[0] == batch
        assert torch.equal(out, both)
        with pytest.raises(ValueError, match=r"2 row\(s\) per sample \(first and last frame\): 4 for 2 samples"):
            model(**{**kw, "encoder_hidden_states_image": kw["encoder_hidden_states_image"][:3]})
