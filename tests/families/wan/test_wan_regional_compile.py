"""Regional compilation (``compile_repeated_blocks``) of a NAG-patched Wan transformer, with nag_scale changing
between calls: the block class compiles a bounded number of graphs, not one per block or per value, and the outputs
equal the authors' computation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import wan_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_wan_transformer import authors_model, inputs, positive, run

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 10  # more than dynamo's recompile limit (8)


def test_blocks_compile_once_per_kind_of_call_whatever_the_scale():
    torch._dynamo.reset()
    model = wan_toy.transformer(layers=LAYERS).double()
    kw = inputs()
    scales = (9.0, 5.0, 11.0, 7.5)
    refs = {s: authors_model(model, scale=s) for s in scales}
    plain = run(model, positive(kw))
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, dynamic=False)
    for scale in scales:
        torch.testing.assert_close(run(model, kw, nag_scale=scale), run(refs[scale], kw), rtol=0, atol=1e-10)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-10)  # a plain call
    # one graph for the guided calls (whatever the scale) and one for the plain call, for all 10 blocks
    assert counter.frame_count <= 2, f"{counter.frame_count} graphs for {LAYERS} blocks"
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=1e-10)


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = wan_toy.transformer().double()
    kw = inputs()
    expected = run(authors_model(model), kw)
    apply_nag(model, backend="torch")
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the record hand-off hook traces too
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=1e-10)
