"""The flops suite keeps working: counts on the meta device, CFG is exactly two plain passes, NAG exact costs more
than a plain step and less than CFG, nothing that looks like a matmul goes uncounted, targets say PASS or FAIL, and
every registered entry builds its full-size model and its inputs (nothing full-size is counted here: the suite
itself, ``python -m benchmarks flops``, takes minutes)."""

import json

import pytest
import torch

from benchmarks import flops
from benchmarks import harness as h
from benchmarks.__main__ import main
from benchmarks.flops_models import MODELS, Target, selected
from meta_models import kandinsky6 as model_kandinsky6

HAVE_INTEGRATION = h.integration_available()


def test_suite_counts_toy(tmp_path):
    rc = main(["flops", "--models", "flux-tiny-256", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("flops-meta-*.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["no_nag"]["status"] == "ok" and rows["no_nag"]["flops"] > 0
    assert rows["cfg"]["ratio_vs_no_nag"] == pytest.approx(2.0)
    for r in rows.values():
        assert r["status"] != "error", r
        if r["status"] == "ok":
            assert r["uncounted_ops"] == [], r["uncounted_ops"]
    if HAVE_INTEGRATION:
        assert 1.0 < rows["nag_exact"]["ratio_vs_no_nag"] < 2.0
    assert tmp_path.joinpath(path.stem + ".md").exists()


def test_registry_selection():
    assert {m.key for m in selected(None, quick=True)} == {"flux-tiny-256", "flux-tiny-512"}
    real = selected(None, quick=False)
    assert {"flux1-1024", "flux1-2048", "wan21-14b-720p", "z-image-1024"} <= {m.key for m in real}
    assert not any(m.toy for m in real)
    with pytest.raises(SystemExit, match="unknown flops model"):
        selected("flux1-1024,nope", quick=False)


# Tensors some models take once for the whole batch (FLUX.1's ids, Krea 2's [T + N, 3] position_ids, Wan Animate 2's
# one-row timestep): the others must double with the batch.
UNBATCHED = ("img_ids", "txt_ids", "position_ids")


def _shared_across_the_batch(key, one, two) -> bool:
    """Not a per-sample tensor: a named position tensor, a one-row timestep both batches share, or one whose first
    dim is not the batch at all (MiniMax-H3's per-segment timesteps: more than one row at batch 1)."""
    return key in UNBATCHED or one.shape[0] != 1 or (key == "timestep" and two.shape[0] == 1)


def test_every_entry_builds_its_inputs():
    """Each entry: its variants are ones the suite counts, its targets name its variants, its full-size model builds
    on meta and its inputs too, at batch 1 and 2 (every batched row doubled, the position ids not)."""
    for entry in MODELS.values():
        known = {"no_nag", "cfg", *flops._NAG_APPLIED, *entry.derived}
        assert entry.variants[:2] == ("no_nag", "cfg") and set(entry.variants) <= known, entry.key
        assert set(entry.targets) <= set(entry.variants), entry.key
        for t in entry.targets.values():
            assert t.max_ratio > 1 and (t.like is None or t.like[0] in MODELS), entry.key
        model = entry.build()
        assert next(model.parameters()).device.type == "meta", entry.key
        one, two = entry.step_inputs(model, 1), entry.step_inputs(model, 2)
        for variant in ("no_nag", "cfg", "nag"):
            assert one[variant] and len(one[variant]) == len(two[variant]), (entry.key, variant)
            for kw1, kw2 in zip(one[variant], two[variant]):
                for key, v in kw1.items():
                    if isinstance(v, torch.Tensor) and v.dim() and not _shared_across_the_batch(key, v, kw2[key]):
                        # activations on meta; integer index / size tensors (grid sizes) may be host tensors
                        assert v.device.type == "meta" or not v.is_floating_point(), (entry.key, key)
                        assert kw2[key].shape[0] == 2 * v.shape[0], (entry.key, variant, key)
                    elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):  # per-sample lists
                        assert len(kw2[key]) == 2 * len(v), (entry.key, variant, key)


def test_sana_entries_build_their_inputs():
    if not hasattr(__import__("diffusers"), "SanaVideoTransformer3DModel"):
        pytest.skip("this diffusers has no Sana-Video (diffusers >= 0.36)")
    for key, tokens in (("sana-1600m-1024", 1024), ("sana-video-2b-832x480x81", 21 * 30 * 52)):
        entry = MODELS[key]
        assert entry.image_tokens == tokens and entry.text_tokens == 300 and set(entry.targets) == {"nag"}
        model = entry.build()
        one, two = entry.step_inputs(model, 1), entry.step_inputs(model, 2)
        assert one["nag"][0]["encoder_hidden_states"].shape[0] == 2 == two["nag"][0]["hidden_states"].shape[0]
        assert two["cfg"][0]["encoder_attention_mask"].shape == (4, 300)


def _row(model, variant, tflop, target=None):
    row = dict(model=model, config=model, resolution=1024, image_tokens=1, text_tokens=1, variant=variant,
               status="ok", flops=tflop * 1e12, tflop=tflop, uncounted_ops=[])
    if target:
        row["target"] = {"max_ratio": target.max_ratio, "label": target.label,
                         "like": list(target.like) if target.like else None}
    return row


def test_targets_pass_fail_and_a_bound_from_another_row():
    like = Target(9.9, "<= a's fast", like=("a", "nag_fast"))
    rows = [_row("a", "no_nag", 10), _row("a", "nag_fast", 11.3),
            _row("b", "no_nag", 10), _row("b", "nag", 11.2, like), _row("c", "no_nag", 10),
            _row("c", "nag", 11.6, Target(1.15, "<= 1.15x"))]
    flops.add_ratios(rows)
    assert rows[3]["target"]["max_ratio"] == pytest.approx(1.13) and rows[3]["target_met"] is True
    assert rows[5]["target_met"] is False
    table = flops.markdown(rows)
    assert "<= 1.15x: **FAIL**" in table and "(1.1300x; counted 1.1200x): **PASS**" in table
    assert "not counted here" in table and "tests/parallel/test_parallel_flux.py" in table
    alone = [_row("b", "no_nag", 10), _row("b", "nag", 11.4, like)]  # a's row not in the run: the fallback bound
    flops.add_ratios(alone)
    assert alone[1]["target"]["max_ratio"] == 9.9 and alone[1]["target_met"] is True


KANDINSKY6_TINY = dict(  # tests/families/kandinsky6/test_kandinsky6_meta.py's tiny config
    in_visual_dim=4, out_visual_dim=8, in_text_dim=24, in_text_dim2=8, time_dim=16, model_dim=24, ff_dim=40,
            num_text_blocks=2, num_visual_blocks=3, axes_dims=(4, 4, 4), in_audio_dim=4, out_audio_dim=8,
            model_dim_a=36, time_dim_a=12, ff_dim_a=20, axes_dims_a=(4, 4, 4))


def test_kandinsky6_entry_builds_its_inputs():
    entry = MODELS["kandinsky6-pro-864x480x121"]
    assert entry.image_tokens == 31 * 30 * 54 and entry.text_tokens == 1024 and set(entry.targets) == {"nag"}
    model = model_kandinsky6.build("kandinsky6-pro-distill", **KANDINSKY6_TINY)
    steps = entry.step_inputs(model, 2)
    assert [len(steps[v]) for v in ("no_nag", "cfg", "nag")] == [1, 2, 1]
    nag = steps["nag"][0]
    assert nag["hidden_states"].shape[0] == 2 and nag["encoder_hidden_states"].shape[0] == 4
    assert nag["encoder_attention_mask"].shape == (4, 1024) and nag["audio_hidden_states"].shape == (2, 218, 4)


def test_hunyuanvideo15_entry_builds_its_inputs():
    entry = MODELS["hunyuanvideo15-720p"]
    assert entry.image_tokens == 31 * 45 * 80 and entry.text_tokens == 1985 and set(entry.targets) == {"nag"}
    model = entry.build()
    one, two = entry.step_inputs(model, 1), entry.step_inputs(model, 2)
    assert len(one["cfg"]) == 2 and one["nag"][0]["encoder_hidden_states"].shape[0] == 2
    assert two["nag"][0]["hidden_states"].shape[0] == 2 and two["nag"][0]["encoder_attention_mask_2"].shape == (4, 256)
    assert one["no_nag"][0]["hidden_states"].shape == (1, 65, 31, 45, 80)
