"""The quality suite: PSNR/SSIM against analytic cases and a direct windowed computation; the tiny random-weight run
end to end (JSON rows, markdown, PNG grid, CLIP with a tiny saved CLIP model); same-seed pairing (fast aliased to exact must give identical images); argument errors."""

import json
import math
import string

import pytest
import torch

from benchmarks import harness as h
from benchmarks import image_metrics as im
from benchmarks import quality, quality_prompts, quality_report
from benchmarks.__main__ import ALL_SUITES, SUITES, main, parser

PROMPTS = [{"prompt": "Portrait of AI researcher.", "nag_negative_prompt": "Glasses."},
           {"prompt": "A bowl of fruit on a table.", "nag_negative_prompt": "Apples."}]

HAVE_INTEGRATION = h.integration_available()
needs_integration = pytest.mark.skipif(not HAVE_INTEGRATION, reason="the Flux integration is not available")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny pipeline's ops are too small for two threads: one is several times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    x = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    assert im.psnr(x, x.clone()) == math.inf


@pytest.mark.parametrize("offset, data_range", [(0.1, 1.0), (0.05, 1.0), (-0.2, 1.0), (12.75, 255.0)])
def test_psnr_constant_offset_is_analytic(offset, data_range):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * data_range
    expected = 20 * math.log10(data_range / abs(offset))  # MSE = offset**2 everywhere
    assert im.psnr(x + offset, x, data_range) == pytest.approx(expected, abs=1e-9)
    assert im.psnr(x, x + offset, data_range) == pytest.approx(expected, abs=1e-9)


def test_psnr_nan_is_never_a_figure():
    x = torch.rand(3, 16, 16)
    y = x.clone()
    y[0, 3, 4] = math.nan
    assert math.isnan(im.psnr(x, y)) and math.isnan(im.ssim(x, y))


def test_ssim_identical_is_one():
    x = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(2))
    assert im.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(0.3, 0.5), (0.8, 0.1), (0.0, 1.0)])
def test_ssim_constant_images_is_analytic(a, b):
    # No variance: the contrast-structure term is C2 / C2 = 1; SSIM is the luminance term alone.
    c1 = (im.SSIM_K1 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x, y = torch.full((3, 16, 16), a, dtype=torch.float64), torch.full((3, 16, 16), b, dtype=torch.float64)
    assert im.ssim(x, y) == pytest.approx(expected, rel=1e-9)


def _ssim_direct(x: torch.Tensor, y: torch.Tensor) -> float:
    """SSIM by explicit loops over every valid 11x11 window of every channel (weighted sums, no convolution)."""
    w = im.gaussian_window().tolist()
    c1, c2 = (im.SSIM_K1) ** 2, (im.SSIM_K2) ** 2
    x, y = x.double().tolist(), y.double().tolist()
    total, count = 0.0, 0
    for ch in range(len(x)):
        for i in range(len(x[ch]) - 10):
            for j in range(len(x[ch][0]) - 10):
                mx = my = sxx = syy = sxy = 0.0
                for u in range(11):
                    for v in range(11):
                        a, b, k = x[ch][i + u][j + v], y[ch][i + u][j + v], w[u][v]
                        mx += k * a
                        my += k * b
                        sxx += k * a * a
                        syy += k * b * b
                        sxy += k * a * b
                vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
                total += ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
                count += 1
    return total / count


def test_ssim_matches_direct_windows():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 14, 13, generator=g)  # odd, non-square: rows and columns must not be swapped
    y = (x + 0.15 * torch.randn(2, 14, 13, generator=g)).clamp(0, 1)
    got = im.ssim(x, y)
    assert got == pytest.approx(_ssim_direct(x, y), abs=1e-12)
    assert 0.2 < got < 0.99


def test_ssim_orders_differences():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 24, 24, generator=g)
    noise = torch.randn(3, 24, 24, generator=g)
    small, large = (x + 0.02 * noise).clamp(0, 1), (x + 0.2 * noise).clamp(0, 1)
    assert 1.0 > im.ssim(x, small) > im.ssim(x, large) > 0.0
    assert im.ssim(x, 1 - x) < 0  # anti-correlated structure
    assert im.psnr(x, small) > im.psnr(x, large)


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        im.psnr(torch.rand(3, 16, 16), torch.rand(3, 16, 17))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        im.ssim(torch.rand(3, 10, 30), torch.rand(3, 10, 30))
    with pytest.raises(TypeError, match="float images"):
        im.ssim(torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------------------
# The suite end to end on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP model with its processor, saved like a hub checkpoint, for the --clip-model path."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".,'":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(5)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _run(tmp_path, *extra):
    rc = main(["quality", "--device", "cpu", "--seeds", "0", "--steps", "2", "--grid-tile", "48",
               "--out", str(tmp_path), *extra])
    (path,) = tmp_path.glob("quality-*.json")
    return rc, json.loads(path.read_text()), path


def _rows(doc):
    return {(r["prompt_id"], r["variant"]): r for r in doc["rows"]}


@needs_integration
@pytest.mark.slow  # a whole suite run with CLIP
def test_tiny_run_writes_rows_table_grid_and_clip(tmp_path, prompts_file, tiny_clip):
    # no --tiny: without a GPU and without --model the tiny pipeline is the default
    rc, doc, path = _run(tmp_path, "--prompts", prompts_file, "--clip-model", tiny_clip, "--save-images")
    assert rc == 0 and doc["finished"] and doc["tiny"] and "meaningless" in doc["note"]
    env = doc["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["date"] and doc["model"]
    rows = _rows(doc)
    assert set(rows) == {(p, v) for p in range(len(PROMPTS)) for v in quality_report.VARIANTS}
    for p in range(len(PROMPTS)):
        for v in ("no_nag", "nag_exact"):
            r = rows[p, v]
            assert r["status"] == "ok", r
            assert r["finite"] and r["seconds"] > 0 and r["seed"] == 0
            assert r["prompt"] == PROMPTS[p]["prompt"] and r["nag_negative"] == PROMPTS[p]["nag_negative_prompt"]
            assert -1 <= r["clip_prompt"] <= 1 and -1 <= r["clip_nag_negative"] <= 1
            assert r["clip_prompt"] != r["clip_nag_negative"]
        exact = rows[p, "nag_exact"]
        # NAG changes the image (finite PSNR), from the same noise (far from unrelated images)
        assert 10 < exact["psnr_vs_no_nag"] < math.inf and 0 < exact["ssim_vs_no_nag"] < 1
        fast = rows[p, "nag_fast"]
        assert fast["status"] == "ok", fast
        assert fast["psnr_vs_nag_exact"] > 0 and "ssim_vs_nag_exact" in fast
    summary = doc["summary"]
    en = summary["comparisons"]["nag_exact_vs_no_nag"]
    assert en["pairs"] == 2
    assert en["psnr_mean"] == pytest.approx(sum(rows[p, "nag_exact"]["psnr_vs_no_nag"] for p in (0, 1)) / 2)
    assert en["ssim_min"] == min(rows[p, "nag_exact"]["ssim_vs_no_nag"] for p in (0, 1))
    assert summary["variants"]["no_nag"]["images"] == 2
    assert summary["variants"]["nag_exact"]["clip_nag_negative_mean"] == pytest.approx(
        sum(rows[p, "nag_exact"]["clip_nag_negative"] for p in (0, 1)) / 2)

    md = path.with_suffix(".md").read_text()
    assert "meaningless" in md and "Glasses." in md and "Apples." in md
    assert "| NAG exact vs no NAG | 2 |" in md
    from PIL import Image

    grid = Image.open(path.with_suffix(".png"))
    assert list(grid.size) == doc["grid_size"]
    assert grid.size[0] >= 3 * 48 and grid.size[1] >= 2 * 48  # three columns, two rows of tiles
    saved = sorted(p.name for p in tmp_path.glob("quality-*-images/*.png"))
    assert len(saved) == sum(r["status"] == "ok" for r in doc["rows"])
    assert "p0-s0-no_nag.png" in saved and Image.open(rows[0, "no_nag"]["image"]).size == (32, 32)


@needs_integration
def test_same_seed_pairs_identical_when_fast_is_exact(tmp_path, prompts_file, monkeypatch):
    """With fast mode replaced by exact mode, fast vs exact must be identical (inf PSNR, SSIM 1): the variants of one
    row start from the same noise and the metrics compare the right images."""
    apply_nag, remove_nag = h.integration_api()

    def fast_is_exact(pipe, *, mode="exact", **kw):
        return apply_nag(pipe, mode="exact", **kw)

    monkeypatch.setattr(h, "integration_api", lambda: (fast_is_exact, remove_nag))
    rc, doc, _ = _run(tmp_path, "--tiny", "--prompts", prompts_file)
    assert rc == 0
    for p in range(len(PROMPTS)):
        fast = _rows(doc)[p, "nag_fast"]
        assert fast["psnr_vs_nag_exact"] == "inf" and fast["ssim_vs_nag_exact"] == pytest.approx(1.0)
        assert fast["psnr_vs_no_nag"] == pytest.approx(_rows(doc)[p, "nag_exact"]["psnr_vs_no_nag"])
    assert doc["summary"]["comparisons"]["nag_fast_vs_nag_exact"]["pairs"] == 2


@needs_integration
def test_model_without_fast_mode_measures_no_nag_and_exact(tmp_path, monkeypatch):
    """A family without fast mode (apply_nag refuses mode='fast') is measured without the fast variant, its tables
    and grid have no fast column, and the run says why."""
    apply_nag, remove_nag = h.integration_api()
    calls = []

    def exact_only(pipe, *, mode=None, **kw):
        calls.append(mode)
        if mode == "fast":
            raise ValueError("this family supports mode in ('exact',), got 'fast'")
        return apply_nag(pipe, mode=mode, **kw)

    monkeypatch.setattr(h, "integration_api", lambda: (exact_only, remove_nag))
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red car.\tBlue.\n")
    rc, doc, path = _run(tmp_path, "--tiny", "--prompts", str(prompts))
    assert rc == 0 and doc["variants"] == ["no_nag", "nag_exact"] and calls.count("fast") == 1
    assert doc["modes"]["fast"].startswith("not supported by this model") and "supports mode" in doc["modes"]["fast"]
    assert {r["variant"] for r in doc["rows"]} == {"no_nag", "nag_exact"}
    assert all(r["status"] == "ok" for r in doc["rows"])
    assert set(doc["summary"]["comparisons"]) == {"nag_exact_vs_no_nag"}
    md = path.with_suffix(".md").read_text()
    assert "NAG fast" not in md and "Fast mode: not supported by this model" in md


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def test_all_leaves_quality_out():
    assert "quality" in SUITES and "quality" not in ALL_SUITES


@pytest.mark.parametrize("content, suffix, message", [
    ('[{"prompt": "a cat"}]', ".json", "entry 0"),
    ("not json", ".json", "not valid JSON"),
    ("a cat without a tab\n", ".txt", "line 1"),
    ("a cat\t \n", ".txt", "non-empty"),
    ("# only a comment\n", ".txt", "no prompts"),
])
def test_bad_prompt_files_name_the_argument(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    with pytest.raises(SystemExit, match=f"--prompts.*{message}"):
        main(["quality", "--device", "cpu", "--prompts", str(path), "--out", str(tmp_path)])


def test_text_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# prompt<TAB>negative\nA red car.\tBlue.\n\nA dog.\tCollar.\n")
    assert quality_prompts.load_prompts(str(path)) == [("A red car.", "Blue."), ("A dog.", "Collar.")]
    assert quality_prompts.load_prompts(None) == list(quality_prompts.PROMPTS) and len(quality_prompts.PROMPTS) >= 6


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--model", "x"], "--tiny and --model"),
    (["--model", "x", "--pipeline-class", "NoSuchPipeline"], "--pipeline-class NoSuchPipeline"),
    (["--nag-tau", "0"], "--nag-tau must be > 0"),
    (["--seeds", "1,b"], "--seeds"),
    (["--height", "40"], "multiples of 16"),
    (["--steps", "0"], "--steps"),
    (["--nag-alpha", "2"], "--nag-alpha"),
])
def test_bad_arguments_name_the_argument(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["quality", "--device", "cpu", "--out", str(tmp_path), *argv])


def test_model_defaults_follow_the_spec():
    args = parser().parse_args(["quality", "--model", "black-forest-labs/FLUX.1-schnell"])
    s = quality.settings_from(args, torch.device("cpu"))
    assert (s.steps, s.guidance_scale, s.max_sequence_length, s.height, s.pipeline_class) == (4, 0.0, 256, 1024, None)
    assert s.nag == {}  # the integration's recommended settings for the pipeline
    assert not s.tiny and s.seeds == (0, 1)
    args = parser().parse_args(["quality", "--model", "/models/FLUX.1-dev", "--pipeline-class", "FluxPipeline",
                                "--nag-scale", "7"])
    s = quality.settings_from(args, torch.device("cpu"))
    assert (s.steps, s.guidance_scale, s.pipeline_class, s.nag) == (25, None, "FluxPipeline", {"nag_scale": 7.0})
    with pytest.raises(SystemExit, match="needs --model"):
        quality.settings_from(parser().parse_args(["quality"]), torch.device("cuda"))


@needs_integration
def test_budget_spent_rows_are_recorded(tmp_path, prompts_file):
    # a CLIP model that cannot be loaded is a note, not a failure
    rc, doc, path = _run(tmp_path, "--tiny", "--prompts", prompts_file, "--budget-s", "0",
                         "--clip-model", str(tmp_path / "no-clip"))
    assert rc == 0 and doc["finished"] and len(doc["rows"]) == len(PROMPTS) * len(quality_report.VARIANTS)
    assert doc["clip_note"].startswith("CLIP similarity skipped") and "no-clip" in doc["clip_note"]
    assert all(r["status"] == "skipped" and "--budget-s" in r["reason"] for r in doc["rows"])
    assert "grid" not in doc and path.with_suffix(".md").exists()


def test_generate_takes_pipelines_whose_first_argument_is_not_the_prompt():
    """FLUX.2 pipelines take ``image`` first: the harness passes the prompt by name (a tiny random-weight
    Flux2KleinPipeline from the tests' builder; the figures mean nothing, the call path does)."""
    import functools
    import importlib.util
    import pathlib
    import sys
    import types

    from benchmarks import quality_pipeline

    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "toys" / "flux2_toy.py"
    spec = importlib.util.spec_from_file_location("flux2_toy", path)
    toy = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("flux2_toy", toy)
    spec.loader.exec_module(toy)

    @functools.wraps(toy.Flux2KleinPipeline.__call__)
    def __call__(self, *args, **kwargs):  # the tiny text encoder has 3 layers, not FLUX.2's default 9/18/27
        kwargs.setdefault("text_encoder_out_layers", toy.LAYERS)
        kwargs.setdefault("max_sequence_length", toy.SEQ_LEN)
        return toy.Flux2KleinPipeline.__call__(self, *args, **kwargs)

    tiny_klein = type("Flux2KleinPipeline", (toy.Flux2KleinPipeline,), {"__call__": __call__})
    pipe = toy.klein(cls=tiny_klein, dtype=torch.float32)
    settings = types.SimpleNamespace(steps=2, height=32, width=32, guidance_scale=None, max_sequence_length=None,
                                     num_frames=None, nag={"nag_scale": 5.0})
    accepted = quality_pipeline.call_parameters(pipe)
    apply_nag, remove_nag = h.integration_api()
    plain = quality_pipeline.generate(pipe, accepted, "a red cat", "blurry", 0, settings, "no_nag")
    with quality_pipeline.nag_applied(pipe, "nag_exact", {"backend": "torch"}, (apply_nag, remove_nag)):
        guided = quality_pipeline.generate(pipe, accepted, "a red cat", "blurry", 0, settings, "nag_exact")
    assert plain.shape == guided.shape == (3, 32, 32)
    assert (plain - guided).abs().max() > 1e-6  # NAG acted (a tiny random VAE damps it; no NAG is bit-identical)
    assert torch.equal(quality_pipeline.generate(pipe, accepted, "a red cat", "blurry", 0, settings, "no_nag"), plain)
