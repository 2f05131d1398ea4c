"""NAG on MiniMax-H3 under diffusers' context parallelism (its ``_cp_plan``: the packed sequence split into one
contiguous chunk per rank at the first block; Ulysses and ring, degree 2, 2 CPU processes, float32).

A guided forward lays the packed sequence out as one chunk per rank of ``[positive text, NAG-negative text, media]``
(``MiniMaxH3Family.deliver``; the index tensors follow), so each rank's chunk holds ``T / P`` text tokens of each
branch and ``M / P`` media rows, and the attention runs as in one process over every rank's keys (the user's CP
backend for the text queries, ``parallel.image_attention`` for the media queries). One launch runs every case and
returns how far the parallel output (rank 0's gathered output) is from the same patched model in one process and from
the independent float64 definition (``minimax_h3_reference``), how far NAG moved the output, and the plain call of
the parallel patched model against one process. Ring attention runs on the helpers' CPU LSE backend. A text length
the degree does not divide is refused by name; tensor parallelism is refused (not implemented)."""

from __future__ import annotations

import copy

import diffusers
import minimax_h3_reference
import minimax_h3_toy as toy
import parallel_helpers as ph
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not hasattr(diffusers, "ContextParallelConfig"), reason="no ContextParallelConfig"),
]

SIZES = {"text": 4, "condition": 4, "audio": 3, "video": 9}  # 4 text tokens, 16 media rows: 2 + 2 + 8 per rank
CALL = {"nag_scale": 8.0, "nag_tau": 1.5, "nag_alpha": 0.5}
TOL = 1e-6  # float32: the parallel run differs from one process by the order of its sums only
CASES = [("ulysses", "exact", 1, False), ("ulysses", "fast", 2, True), ("ring", "exact", 2, False)]


def forward(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)


def diff(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def run_case(kind, mode, batch, permute, lse_backend) -> dict:
    from nag_kernels.integrations import apply_nag

    model = toy.transformer(dtype=torch.float32)
    kw = toy.inputs(batch=batch, permute=permute, dtype=torch.float32, **SIZES)
    with torch.no_grad():
        kw64 = {k: v.double() if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}
        expected = minimax_h3_reference.minimax_h3_forward(copy.deepcopy(model).double(), **kw64, **CALL)
    plain = forward(model, toy.positive(kw))
    apply_nag(model, mode=mode, backend="torch")
    single = forward(model, kw, **CALL)
    if kind == "ring":
        model.set_attention_backend(lse_backend)
    model.enable_parallelism(config=ph.cp_config(kind))
    out = forward(model, kw, **CALL)
    again = forward(model, toy.positive(kw))
    return {"single": diff(out, single), "reference": diff(out, expected), "single_reference": diff(single, expected),
            "nag_effect": diff(single, plain), "plain": diff(again, plain)}


def indivisible_text() -> str:
    from nag_kernels.integrations import apply_nag

    model = apply_nag(toy.transformer(dtype=torch.float32), backend="torch")
    model.enable_parallelism(config=ph.cp_config("ulysses"))
    try:  # 5 text tokens, 15 media rows: the stock plan splits the 20 rows, NAG's chunks cannot be equal
        forward(model, toy.inputs(dtype=torch.float32, text=5, condition=3, audio=3, video=9), **CALL)
    except ValueError as err:
        return str(err)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    backend = ph.register_cpu_lse_backend()
    results = {case: run_case(*case, lse_backend=backend) for case in CASES}
    results["indivisible_text"] = indivisible_text()
    return results


@pytest.fixture(scope="module")
def results():
    return ph.launch(_worker)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}-{m}-batch{b}{'-permuted' if p else ''}" for k, m, b, p in CASES])
def test_context_parallel_nag_equals_one_process_and_the_definition(results, case):
    r = results[case]
    assert r["nag_effect"] > 1e-4, r  # NAG acts (well above TOL)
    assert r["single"] < TOL, r
    assert r["reference"] < TOL and r["single_reference"] < TOL, r
    assert r["plain"] < TOL, r  # a plain call of the parallel patched model is the stock parallel forward


def test_a_text_length_the_degree_does_not_divide_is_refused_by_name(results):
    assert "encoder_hidden_states: 5" in results["indivisible_text"]
    assert "divisible by 2" in results["indivisible_text"]
