"""MiniMax-H3 under diffusers' context parallelism (its ``_cp_plan``: the packed sequence split at the first block;
Ulysses, degree 2, 2 CPU processes, float32): plain calls of the NAG-patched model run the stock parallel forward
(equal to one process), and a guided call is refused at the call with an error naming the parallelism, on every rank
(docs/families/minimax_h3.md, "Refusals"). The sequence (text 4 + conditioning 4 + audio 3 + video 9 = 20 rows)
splits evenly in two."""

from __future__ import annotations

import diffusers
import minimax_h3_toy as toy
import parallel_helpers as ph
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not hasattr(diffusers, "ContextParallelConfig"), reason="no ContextParallelConfig"),
]

SIZES = dict(text=4, condition=4, audio=3, video=9)


def _worker(rank: int, world: int) -> dict:
    from nag_kernels.integrations import apply_nag

    model = toy.transformer(dtype=torch.float32)
    kw = toy.inputs(dtype=torch.float32, **SIZES)
    with torch.no_grad():
        alone = model(**toy.positive(kw), return_dict=False)
    apply_nag(model, backend="torch")
    model.enable_parallelism(config=ph.cp_config("ulysses"))
    with torch.no_grad():
        plain = model(**toy.positive(kw), return_dict=False)
        try:
            model(**kw, return_dict=False)
            refused = None
        except NotImplementedError as err:
            refused = str(err)
    return {"plain": max(float((a - b).abs().max()) for a, b in zip(plain, alone)), "refused": refused}


def test_plain_calls_run_and_the_guided_call_is_refused_under_the_cp_plan():
    result = ph.launch(_worker)
    assert result["plain"] < 1e-5
    assert result["refused"] is not None and "under diffusers' parallelism" in result["refused"]
    assert "_cp_plan" in result["refused"]
