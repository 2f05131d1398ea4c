"""NAG on quantized and low-precision models: torchao int8 weight-only (``quantize_``, and diffusers' ``TorchAoConfig``
front end), diffusers' GGUF quantizer (a Q8_0 file loaded with ``from_single_file``) and ``enable_layerwise_casting``
(float8 storage), on tiny random-weight FLUX.1 (exact and fast modes, also with fused QKV and through FluxPipeline),
Wan and SDXL models computing in float32 and in bfloat16, and on the other families' toy models (Chroma, FLUX.2,
Qwen-Image, SD3, LTX-Video, Z-Image) in float32.

NAG only calls the model's modules (projections are called, never read as weights), so on a quantized model a guided
forward must equal the NAG algorithm run on the same quantized modules: the FLUX.1 reference is
``flux_reference.flux_forward`` on the quantized model; the Wan and SDXL references are the authors' cross-attention
processors (``test_wan_transformer`` / ``test_sdxl_unet``) set on the same quantized model before ``apply_nag``. The
kernel backend (``"auto"``: the Triton interpreter on CPU) must agree with the PyTorch combine (``backend="torch"``),
plain and ``nag_scale=1`` calls must be bit-identical to the stock quantized model, ``remove_nag`` must restore it, and
NAG's effect (guided minus plain) on the quantized model must stay close to its effect on the unquantized model. For
the other families the fused kernels are checked against the PyTorch combine, with the same plain-call, removal and
effect checks.

bitsandbytes: diffusers' ``BitsAndBytesConfig`` quantizer refuses to load without a GPU (its ``validate_environment``
raises "No GPU found"), so that test runs only where CUDA and bitsandbytes are present.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, WanTransformer3DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_wan import WanAttention

import flux_toy
import sdxl_toy
import test_flux_pipeline as flux_pipe
import test_flux_transformer as flux_t
import test_sdxl_unet as sdxl_t
import test_wan_transformer as wan_t
import wan_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B = 2
F32, BF16 = torch.float32, torch.bfloat16
# Guided forward vs the reference on the same quantized modules (|out| ~ 1): float32, a few ulps; bfloat16, the two
# computations round differently along the way (measured: at most 1.5 bfloat16 ulps of the outputs).
TOL = {F32: dict(rtol=2e-5, atol=2e-5), BF16: dict(rtol=2e-2, atol=2e-2)}


def _need(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({why}; pip install 'nag-kernels[test]')")


# --- quantizers: each takes a model in `dtype` and returns the quantized model with the same random weights --------


def torchao_quantize_(model, tmp_path, dtype=F32):
    """torchao's own front end: ``quantize_(model, Int8WeightOnlyConfig())`` (int8 weights, compute in ``dtype``)."""
    _need("torchao", "torchao int8 weight-only")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def torchao_from_pretrained(model, tmp_path, dtype=F32):
    """diffusers' front end: ``from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``."""
    _need("torchao", "diffusers' TorchAoConfig")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    model.save_pretrained(tmp_path / "model")
    config = TorchAoConfig(Int8WeightOnlyConfig())
    return type(model).from_pretrained(tmp_path / "model", quantization_config=config, torch_dtype=dtype).eval()


def write_gguf(model, path) -> None:
    """A GGUF file of ``model``'s state dict under diffusers' key names, laid out as the GGUF converters do: the
    weights of ``nn.Linear`` layers as Q8_0 (BF16 where the input width is not a multiple of Q8_0's block of 32),
    everything else (biases, norms, convolutions, embeddings) as F32."""
    import gguf

    quant = gguf.GGMLQuantizationType
    linear = {name + ".weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    writer = gguf.GGUFWriter(str(path), "nag-test")
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name in linear:
            kind = quant.Q8_0 if array.shape[-1] % 32 == 0 else quant.BF16
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_single_file(model, tmp_path, dtype=F32):
    """diffusers' GGUF quantizer: ``from_single_file(model.gguf, config=<local dir>, quantization_config=
    GGUFQuantizationConfig(compute_dtype=dtype))``. The file's keys are diffusers' own, so no key conversion runs;
    the config comes from a local directory, so nothing is downloaded."""
    _need("gguf", "diffusers' GGUF quantizer")
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model.save_config(tmp_path)
    write_gguf(model, tmp_path / "model.gguf")
    loaded = type(model).from_single_file(
        str(tmp_path / "model.gguf"), config=str(tmp_path), local_files_only=True, torch_dtype=dtype,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
    )
    assert any(isinstance(m, GGUFLinear) and m.weight.quant_type.name == "Q8_0" for m in loaded.modules())
    return loaded.eval()


def fp8_layerwise_casting(model, tmp_path, dtype=F32):
    """``enable_layerwise_casting``: weights stored as float8_e4m3fn, upcast per layer on the fly to ``dtype``."""
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return model


QUANTIZERS = [torchao_quantize_, torchao_from_pretrained, gguf_single_file, fp8_layerwise_casting]
_ids = dict(ids=lambda q: q.__name__)
# How far NAG's effect (guided - plain) on the quantized model may be from its effect on the unquantized model,
# relative to the largest |effect|, in float32. Measured: int8 and Q8_0 at most 2%, float8 e4m3 at most 25% (SDXL;
# its outputs themselves move by ~10%); a NAG that lost or mis-scaled the guidance would be off by ~100%.
EFFECT_TOL = {"torchao_quantize_": 0.1, "torchao_from_pretrained": 0.1, "gguf_single_file": 0.1,
              "fp8_layerwise_casting": 0.5}


def cast(kw, dtype):
    def one(v):
        if isinstance(v, dict):
            return cast(v, dtype)
        if isinstance(v, list):  # Z-Image's per-sample lists
            return [one(x) for x in v]
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return {k: one(v) for k, v in kw.items()}


def check_guided(model, run, kw, positive_kw, expected, dtype, **settings):
    """``apply_nag`` on the quantized ``model``: its guided forward against ``expected``, the ``"auto"`` backend
    against ``"torch"``, plain and ``nag_scale=1`` calls bit-identical to the stock quantized model, then
    ``remove_nag`` restores it. Returns ``(guided, plain)`` outputs."""
    plain = run(model, positive_kw)
    apply_nag(model, backend="torch", **settings)
    out = run(model, kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])
    apply_nag(model, backend="auto", **settings)  # TRITON_INTERPRET=1 (conftest): the fused kernels on the CPU
    torch.testing.assert_close(run(model, kw), out, **TOL[dtype])
    assert torch.equal(run(model, positive_kw), plain)  # equal batches: the stock quantized forward
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)  # scale 1: the negative rows are dropped
    remove_nag(model)
    assert torch.equal(run(model, positive_kw), plain)
    return out, plain


def check_effect(tol, dtype, guided, plain, full_guided, full_plain):
    if dtype != F32:  # in bfloat16 the toy FLUX.1 / Wan effects are a few ulps: the float32 runs carry this check
        return
    effect, q_effect = full_guided - full_plain, guided - plain
    assert effect.abs().max() > 1e-4  # NAG acts on the toy model, far above float32 noise (~1e-7)
    error = float((q_effect - effect).abs().max() / effect.abs().max())
    assert error < tol, f"NAG's effect moved by {error:.1%} (tolerance {tol:.0%}) after quantization"


DTYPES = pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])


# --- FLUX.1 ---------------------------------------------------------------------------------------------------------


def flux_build(dtype=F32, fused=False):
    model = flux_toy.transformer(guidance=True).to(dtype)
    if fused:
        model.fuse_qkv_projections()
    return model


def flux_inputs(dtype=F32):
    return cast(flux_t.inputs(guidance=True), dtype)


@DTYPES
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("quantizer", QUANTIZERS, **_ids)
def test_flux(quantizer, mode, dtype, tmp_path):
    model = quantizer(flux_build(dtype), tmp_path, dtype)
    kw = flux_inputs(dtype)
    expected = flux_t.reference(model, kw, mode=mode)  # the NAG algorithm on the quantized model's own modules
    out, plain = check_guided(model, flux_t.run, kw, flux_t.positive(kw), expected, dtype, mode=mode)

    full = flux_build(dtype)
    full_plain = flux_t.run(full, flux_t.positive(kw))
    full_out = flux_t.run(apply_nag(full, backend="torch", mode=mode), kw)
    check_effect(EFFECT_TOL[quantizer.__name__], dtype, out, plain, full_out, full_plain)


@pytest.mark.parametrize("quantizer", [torchao_quantize_, fp8_layerwise_casting], **_ids)
def test_flux_quantized_after_apply_nag(quantizer, tmp_path):
    # The other order: NAG patches the float32 model, the quantizer then swaps the weights / adds its casting hooks
    # under NAG's processors and forwards. remove_nag afterwards leaves the stock quantized model.
    kw = flux_inputs()
    stock = quantizer(flux_build(), tmp_path)
    plain = flux_t.run(stock, flux_t.positive(kw))
    model = quantizer(apply_nag(flux_build(), backend="torch"), tmp_path)
    out = flux_t.run(model, kw)
    torch.testing.assert_close(out, flux_t.reference(model, kw), **TOL[F32])
    torch.testing.assert_close(out, flux_t.reference(stock, kw), **TOL[F32])
    assert torch.equal(flux_t.run(model, flux_t.positive(kw)), plain)
    remove_nag(model)
    assert torch.equal(flux_t.run(model, flux_t.positive(kw)), plain)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("quantizer", [torchao_quantize_, fp8_layerwise_casting], **_ids)
def test_flux_fused_qkv_then_quantized(quantizer, mode, tmp_path):
    # fuse_qkv_projections, then the quantizer: NAG's processors project through the fused quantized to_qkv (diffusers'
    # _get_qkv_projections). (Fusing an already quantized model fails in diffusers itself, NAG or not: torch.cat of
    # torchao's Int8Tensor is not implemented, and the fused float8 Linear cannot be initialized.)
    model = quantizer(flux_build(fused=True), tmp_path)
    assert model.transformer_blocks[0].attn.fused_projections
    assert model.single_transformer_blocks[0].attn.fused_projections
    kw = flux_inputs()
    check_guided(model, flux_t.run, kw, flux_t.positive(kw), flux_t.reference(model, kw, mode=mode), F32, mode=mode)


@pytest.mark.parametrize("quantizer", [torchao_quantize_, gguf_single_file, fp8_layerwise_casting], **_ids)
def test_flux_pipeline_with_a_quantized_transformer(quantizer, tmp_path):
    parts = flux_toy.components()
    parts["transformer"] = quantizer(parts["transformer"].float(), tmp_path)
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    kw = {**flux_pipe.COMMON, "latents": flux_toy.latents(1, dtype=F32), "guidance_scale": 0.0}
    stock = pipe("a red cat", **kw).images
    forward = flux_pipe.reference_forward(pipe.transformer, flux_pipe.negative_embeds(pipe, "blurry dog"))
    expected = flux_pipe.run_reference(pipe, forward, "a red cat", **kw)
    apply_nag(pipe, backend="torch")
    out = pipe("a red cat", nag_negative_prompt="blurry dog", **kw).images
    torch.testing.assert_close(out, expected, **TOL[F32])
    assert (out - stock).abs().max() > 1e-4
    assert torch.equal(pipe("a red cat", **kw).images, stock)
    remove_nag(pipe)
    assert torch.equal(pipe("a red cat", **kw).images, stock)


# --- Wan ------------------------------------------------------------------------------------------------------------

WAN_SETTINGS = dict(nag_scale=9.0, nag_tau=3.5, nag_alpha=0.25)


def wan_build(dtype=F32, fused=False):
    # Width 32 (2 heads x 16; wan_toy's is 2 x 12) so that the attention projections are GGUF Q8_0 (blocks of 32).
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=wan_toy.TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    )
    with torch.no_grad():  # as wan_toy: widen diffusers' init so that NAG changes the output
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    if fused:
        model.fuse_qkv_projections()
    return model.to(dtype).eval()


def with_processors(model, attention_cls, make, run, kw):
    """``run(model, kw)`` with ``make()`` as the processor of every cross-attention module, then the processors back
    (the reference runs on the very model under test: a deep copy would lose diffusers' layerwise-casting hooks)."""
    saved = dict(model.attn_processors)
    for module in model.modules():
        if isinstance(module, attention_cls) and module.is_cross_attention:
            module.set_processor(make())
    try:
        return run(model, kw)
    finally:
        model.set_attn_processor(saved)


def wan_reference(model, kw):
    return with_processors(model, WanAttention, lambda: wan_t.AuthorsWanCrossAttention(9.0, 3.5, 0.25), wan_t.run, kw)


@DTYPES
@pytest.mark.parametrize("quantizer", QUANTIZERS, **_ids)
def test_wan(quantizer, dtype, tmp_path):
    model = quantizer(wan_build(dtype), tmp_path, dtype)
    kw = cast(wan_t.inputs(), dtype)
    expected = wan_reference(model, kw)
    out, plain = check_guided(model, wan_t.run, kw, wan_t.positive(kw), expected, dtype, **WAN_SETTINGS)

    full = wan_build(dtype)
    full_plain = wan_t.run(full, wan_t.positive(kw))
    full_out = wan_t.run(apply_nag(full, backend="torch", **WAN_SETTINGS), kw)
    check_effect(EFFECT_TOL[quantizer.__name__], dtype, out, plain, full_out, full_plain)


@pytest.mark.parametrize("quantizer", [torchao_quantize_, fp8_layerwise_casting], **_ids)
def test_wan_fused_projections_then_quantized(quantizer, tmp_path):
    model = quantizer(wan_build(fused=True), tmp_path)
    assert model.blocks[0].attn2.fused_projections
    kw = cast(wan_t.inputs(), F32)
    check_guided(model, wan_t.run, kw, wan_t.positive(kw), wan_reference(model, kw), F32, **WAN_SETTINGS)


# --- SDXL -----------------------------------------------------------------------------------------------------------

SDXL_SETTINGS = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.5)


@DTYPES
@pytest.mark.parametrize("quantizer", QUANTIZERS, **_ids)
def test_sdxl_unet(quantizer, dtype, tmp_path):
    model = quantizer(sdxl_toy.unet().to(dtype), tmp_path, dtype)
    kw = cast(sdxl_t.inputs(), dtype)
    positive = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:B]}
    expected = with_processors(model, Attention, lambda: sdxl_t.AuthorsCrossAttention(5.0, 2.5, 0.5), sdxl_t.run, kw)
    out, plain = check_guided(model, sdxl_t.run, kw, positive, expected, dtype, **SDXL_SETTINGS)

    full = sdxl_toy.unet().to(dtype)
    full_plain = sdxl_t.run(full, positive)
    full_out = sdxl_t.run(apply_nag(full, backend="torch", **SDXL_SETTINGS), kw)
    check_effect(EFFECT_TOL[quantizer.__name__], dtype, out, plain, full_out, full_plain)


# --- the other families: the fused kernels against the PyTorch combine, plain calls, removal, NAG's effect ---------


def _zimage_inputs():
    import test_zimage_transformer as zimage_t
    import zimage_toy

    return dict(x=zimage_toy.latents(1), t=zimage_t.t_of(1), caps=zimage_toy.captions([5, 40]))


def _zimage_run(model, kw, **call):
    import test_zimage_transformer as zimage_t

    return zimage_t.run(model, kw["x"], kw["t"], kw["caps"], **call)


def _family(name):
    """(build, inputs, run, positive, modes) of a family's toy model and its transformer test's helpers."""
    if name == "zimage":
        import zimage_toy

        return zimage_toy.transformer, _zimage_inputs, _zimage_run, lambda kw: {**kw, "caps": kw["caps"][:1]}, \
            ("exact", "fast")
    toy = importlib.import_module(f"{name}_toy")
    test = importlib.import_module(f"test_{name}_transformer")
    if name == "ltx":
        return toy.transformer, test.inputs, test.run, lambda kw: test.plain_rows(kw, B), ("exact",)
    modes = ("exact", "fast") if name in ("chroma", "flux2") else ("exact",)
    return toy.transformer, test.inputs, test.run, test.positive, modes


def flat(out):
    return torch.cat([x.flatten() for x in out]) if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("quantizer", [torchao_quantize_, gguf_single_file, fp8_layerwise_casting], **_ids)
@pytest.mark.parametrize("family", ["chroma", "flux2", "qwenimage", "sd3", "ltx", "zimage"])
def test_other_families(family, quantizer, tmp_path):
    build, inputs, run, positive, modes = _family(family)
    model, full = quantizer(build().float(), tmp_path), build().float()
    kw = cast(inputs(), F32)
    plain, full_plain = flat(run(model, positive(kw))), flat(run(full, positive(kw)))
    for mode in modes:
        out = flat(run(apply_nag(model, backend="torch", mode=mode), kw))
        apply_nag(model, backend="auto", mode=mode)
        torch.testing.assert_close(flat(run(model, kw)), out, **TOL[F32])
        assert torch.equal(flat(run(model, positive(kw))), plain)
        assert torch.equal(flat(run(model, kw, nag_scale=1.0)), plain)
        full_out = flat(run(apply_nag(full, backend="torch", mode=mode), kw))
        check_effect(EFFECT_TOL[quantizer.__name__], F32, out, plain, full_out, full_plain)
    remove_nag(model)
    assert torch.equal(flat(run(model, positive(kw))), plain)


# --- bitsandbytes ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "bitsandbytes through diffusers needs a GPU: BitsAndBytesConfig's quantizers (diffusers/quantizers/bitsandbytes/"
    "bnb_quantizer.py, validate_environment) raise 'No GPU found. A GPU is needed for quantization.' without CUDA/XPU"))
@pytest.mark.parametrize("bits", [4, 8])
def test_flux_bitsandbytes(bits, tmp_path):
    _need("bitsandbytes", "bitsandbytes quantization")
    from diffusers import BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=F32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    flux_build().save_pretrained(tmp_path / "model")
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "model", quantization_config=config, torch_dtype=F32)
    model.eval()
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    positive = flux_t.positive(kw)
    # flux_reference builds its RoPE and timestep tables on the CPU, so here the PyTorch combine (backend="torch") is
    # the reference for the fused kernels, and the unquantized model's NAG effect the reference for the guidance.
    # Strong settings: bitsandbytes computes in float16 inside its int8 / NF4 layers, and the toy's default NAG effect
    # (~1e-3) would be close to that noise. Not run on this project's CPU-only CI (see the skip reason).
    strong = dict(nag_scale=20.0, nag_tau=10.0, nag_alpha=1.0)
    plain = flux_t.run(model, positive)
    out = flux_t.run(apply_nag(model, backend="torch", **strong), kw)
    torch.testing.assert_close(flux_t.run(apply_nag(model, backend="auto", **strong), kw), out, rtol=2e-3, atol=2e-3)
    assert torch.equal(flux_t.run(model, positive), plain)
    assert torch.equal(flux_t.run(model, kw, nag_scale=1.0), plain)
    remove_nag(model)
    assert torch.equal(flux_t.run(model, positive), plain)
    full = flux_build().cuda()
    full_plain = flux_t.run(full, positive)
    full_out = flux_t.run(apply_nag(full, backend="torch", **strong), kw)
    check_effect(0.3 if bits == 8 else 0.5, F32, out, plain, full_out, full_plain)
