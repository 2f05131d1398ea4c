"""NAG on Qwen-Image under diffusers' context parallelism (degree 2, 2 CPU processes, float32): Ulysses with text
masks; ring without a mask (on the helpers' CPU LSE backend); ring with a text mask refused by name.

Qwen-Image's ``_cp_plan`` splits the image and the text tokens (and each block's text mask) along the sequence at
the first block, after NAG's pre-hook has seen the ``2B`` text rows. Under CP the NAG processor runs the unsplit
per-branch attention over ``[text_b ; image]`` with the branch's joint key mask through the user's backend (Ulysses
all-gathers the local key masks in the key order of its all-to-all), and combines each rank's image tokens locally
(all heads of a token are on its rank). One launch runs every case and returns, per case, how far the parallel output
(rank 0's gathered output) is from the same patched model in one process and from the independent float64
computation ``qwenimage_toy.qwen_forward`` on the same weights, and how far NAG moved the output. diffusers' ring
template applies a rank's local key mask to every rank's keys, so NAG refuses a masked guided call under ring.
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

import parallel_helpers as ph
import qwenimage_toy

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        not hasattr(diffusers, "ContextParallelConfig"),
        reason=f"diffusers {diffusers.__version__} has no context parallelism (ContextParallelConfig)",
    ),
]

T, N = 8, 64  # text tokens, image tokens (both split in 2 by the plan)
TOL = 1e-6  # float32: the parallel run differs from one process by the order of its sums only
LENGTHS = {1: (6, 3), 2: (8, 6, 3, 5)}  # text mask: valid tokens per text row (positive rows, then negative rows)
CALL = {"nag_scale": 8.0, "nag_tau": 1.5, "nag_alpha": 0.5}  # strong enough that the tau clamp acts


def inputs(batch: int, masked: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2 * batch, T, dtype=torch.long)
    for row, length in enumerate(LENGTHS[batch]):  # rank 1's text slice is all padding for the length-3 row
        mask[row, length:] = 0
    return dict(
        hidden_states=torch.randn(batch, N, 16, generator=g),
        encoder_hidden_states=torch.randn(2 * batch, T, qwenimage_toy.TEXT_DIM, generator=g),
        encoder_hidden_states_mask=mask if masked else None,
        timestep=torch.full((batch,), 0.6),
        img_shapes=[[(1, qwenimage_toy.SIDE, qwenimage_toy.SIDE)]] * batch,
    )


def positive(kw: dict) -> dict:
    batch = kw["hidden_states"].shape[0]
    mask = kw["encoder_hidden_states_mask"]
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch],
            "encoder_hidden_states_mask": None if mask is None else mask[:batch]}


def forward(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)[0]


def run_case(kind: str, batch: int, masked: bool, lse_backend: str) -> dict:
    """Diffs of the parallel NAG output from one process and from the float64 computation (module docstring)."""
    from nag_kernels.integrations import apply_nag

    model = qwenimage_toy.transformer()
    kw = inputs(batch, masked)
    with torch.no_grad():
        kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        expected = qwenimage_toy.qwen_forward(copy.deepcopy(model).double(), *kw64.values(), **CALL).float()
    plain = forward(model, positive(kw))
    apply_nag(model, backend="torch")
    single = forward(model, kw, **CALL)
    if kind == "ring":
        model.set_attention_backend(lse_backend)
    model.enable_parallelism(config=ph.cp_config(kind))
    out = forward(model, kw, **CALL)
    again = forward(model, positive(kw))  # a plain forward of the parallel patched model
    return {
        "single": (out - single).abs().max().item(),
        "single_reference": (single - expected).abs().max().item(),
        "reference": (out - expected).abs().max().item(),
        "nag_effect": (single - plain).abs().max().item(),
        "plain": (again - plain).abs().max().item(),
    }


CASES = [("ulysses", 1, True), ("ulysses", 2, True), ("ring", 2, False)]  # (CP kind, batch, text mask)


def ring_with_mask() -> str:
    """The refusal of a guided call with a text mask under ring attention (its message)."""
    from nag_kernels.integrations import apply_nag

    model = apply_nag(qwenimage_toy.transformer(), backend="torch")
    model.enable_parallelism(config=ph.cp_config("ring"))
    try:
        forward(model, inputs(1), **CALL)
    except NotImplementedError as err:
        return str(err)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    backend = ph.register_cpu_lse_backend()
    results = {case: run_case(*case, lse_backend=backend) for case in CASES}
    results["ring_with_mask"] = ring_with_mask()
    return results


@pytest.fixture(scope="module")
def results():
    return ph.launch(_worker)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[1]}-{'mask' if c[2] else 'no-mask'}")
def test_context_parallel_equals_one_process_and_the_reference(results, case):
    result = results[case]
    assert result["nag_effect"] > 1e-3, result  # NAG moved the output: the equalities below are not vacuous
    assert result["single_reference"] < 2e-6, result  # the one-process float32 run is the float64 computation
    assert result["single"] < TOL, result
    assert result["reference"] < 2e-6, result
    assert result["plain"] < TOL, result


def test_ring_with_a_text_mask_is_refused_by_name(results):
    message = results["ring_with_mask"]
    assert "Qwen-Image" in message and "ring" in message and "text mask" in message, message
