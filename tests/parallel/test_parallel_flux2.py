"""NAG on FLUX.2 under diffusers' context parallelism (Ulysses, ring) and tensor parallelism (degree 2, 2 CPU
processes, float32).

A guided FLUX.2 forward packs both branches' text along the sequence (``[B, 2T, D]``, the branches' tokens
interleaved) and diffusers' ``_cp_plan`` splits that sequence (and ``txt_ids``, ``img_ids``, the image tokens) into
one contiguous slice per rank: every rank then holds the same text positions of both branches and unpacks its own
slice (integrations/flux2.py). One launch runs every case and returns, per case, how far the parallel output (rank
0's gathered output) is from the same patched model in one process and from the independent float64 2B-layout
computation ``flux2_reference.flux2_forward`` on the same weights, and how far NAG moved the output. Ring attention
runs on the helpers' CPU LSE backend. A text length the degree does not divide is refused by name. Under tensor
parallelism the combine all-reduces its per-token norms over the heads' ranks (``parallel.combine_sharded``; the
fused single blocks' group is read from ``to_qkv_mlp_proj``).
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

import flux2_reference
import flux2_toy
import parallel_helpers as ph

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        not hasattr(diffusers, "ContextParallelConfig"),
        reason=f"diffusers {diffusers.__version__} has no context parallelism (ContextParallelConfig)",
    ),
]

T, N = 8, 16  # text tokens per branch (the packed 2T = 16 split in 2), image tokens (a 4x4 latent grid)
TOL = 1e-6  # float32: the parallel run differs from one process by the order of its sums only
CALL = {"nag_scale": 8.0, "nag_tau": 1.5, "nag_alpha": 0.5}  # strong enough that the tau clamp acts


def inputs(batch: int, guidance: bool, text_len: int = T, seed: int = 0) -> dict:
    """The pipelines' 3-D ``img_ids`` / ``txt_ids`` (diffusers' plan splits only those)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(1, N, 4)
    img_ids[0, :, 1], img_ids[0, :, 2] = torch.arange(N) // 4, torch.arange(N) % 4
    txt_ids = torch.zeros(batch, text_len, 4)
    txt_ids[..., 3] = torch.arange(text_len)
    return dict(
        hidden_states=torch.randn(batch, N, 16, generator=g),
        encoder_hidden_states=torch.randn(2 * batch, text_len, flux2_toy.TEXT_DIM, generator=g),
        timestep=torch.full((batch,), 0.7),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 3.5) if guidance else None,
    )


def positive(kw: dict) -> dict:
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: kw["hidden_states"].shape[0]]}


def forward(model, kw, **jak):
    with torch.no_grad():
        return model(**kw, joint_attention_kwargs=jak or None, return_dict=False)[0]


def run_case(kind: str, mode: str, batch: int, guidance: bool, lse_backend: str) -> dict:
    """Diffs of the parallel NAG output from one process and from the float64 computation (module docstring)."""
    from nag_kernels.integrations import apply_nag

    model = flux2_toy.transformer(guidance=guidance)
    kw = inputs(batch, guidance)
    with torch.no_grad():
        kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        expected = flux2_reference.flux2_forward(copy.deepcopy(model).double(), **kw64, **CALL).float()
    plain = forward(model, positive(kw))
    apply_nag(model, mode=mode, backend="torch")
    single = forward(model, kw, **CALL)
    if kind == "ring":
        model.set_attention_backend(lse_backend)
    model.enable_parallelism(config=ph.tp_config() if kind == "tp" else ph.cp_config(kind))
    out = forward(model, kw, **CALL)
    again = forward(model, positive(kw))  # a plain forward of the parallel patched model
    return {
        "single": (out - single).abs().max().item(),
        "single_reference": (single - expected).abs().max().item(),
        "reference": (out - expected).abs().max().item(),
        "nag_effect": (single - plain).abs().max().item(),
        "plain": (again - plain).abs().max().item(),
    }


def indivisible_text() -> str:
    """The refusal of a guided call whose text length (7) the degree (2) does not divide (its message)."""
    from nag_kernels.integrations import apply_nag

    model = apply_nag(flux2_toy.transformer(), backend="torch")
    model.enable_parallelism(config=ph.cp_config("ulysses"))
    try:
        forward(model, inputs(1, False, text_len=7), **CALL)
    except ValueError as err:
        return str(err)
    return "no error"


CASES = [  # (CP kind, mode, batch, guidance embeds); both modes are the same computation on FLUX.2
    ("ulysses", "exact", 1, True),
    ("ulysses", "fast", 2, False),
    ("ring", "exact", 2, False),
    ("tp", "exact", 2, True),
]
HAS_TP = hasattr(diffusers, "TensorParallelConfig")


def _worker(rank: int, world: int) -> dict:
    backend = ph.register_cpu_lse_backend()
    results = {case: run_case(*case, lse_backend=backend) for case in CASES if HAS_TP or case[0] != "tp"}
    results["indivisible_text"] = indivisible_text()
    return results


@pytest.fixture(scope="module")
def results():
    return ph.launch(_worker)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_parallel_equals_one_process_and_the_reference(results, case):
    if case[0] == "tp" and not HAS_TP:
        pytest.skip(f"diffusers {diffusers.__version__} has no tensor parallelism (TensorParallelConfig)")
    result = results[case]
    assert result["nag_effect"] > 1e-4, result  # NAG moved the output (>100x the tolerances): not vacuous
    assert result["single_reference"] < 2e-6, result  # the one-process float32 run is the float64 computation
    assert result["single"] < TOL, result
    assert result["reference"] < 2e-6, result
    assert result["plain"] < TOL, result


def test_text_length_not_divisible_by_the_degree_is_refused_by_name(results):
    message = results["indivisible_text"]
    assert "FLUX.2" in message and "context parallelism" in message and "divisible" in message, message
