"""Regional compilation of a NAG-patched Flux transformer (diffusers' ``compile_repeated_blocks``): each block class
compiles a handful of graphs, not one per block. With per-block ``forward`` wrappers every block recompiled, and past
dynamo's recompile limit (8) the remaining blocks ran eagerly without any error (seen on FLUX.1's 19 double
blocks on an H200). The outputs still have to equal the independent fp64 reference."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import flux_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_flux_transformer import inputs, positive, reference, run

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 10  # double and single blocks each: more than the recompile limit


def compile_blocks(model, backend):
    if hasattr(model, "compile_repeated_blocks"):  # diffusers >= 0.35, the user's path
        model.compile_repeated_blocks(backend=backend, dynamic=False)
    else:
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            block.compile(backend=backend, dynamic=False)


@pytest.mark.parametrize(
    "mode, most_graphs",
    # exact: double block, and single blocks first (B image rows in), middle, last (keeps the positive half);
    # fast: one graph per block class.
    [("exact", 4), ("fast", 2)],
)
def test_each_block_class_compiles_once_not_once_per_block(mode, most_graphs):
    torch._dynamo.reset()
    model = flux_toy.transformer(layers=LAYERS, single_layers=LAYERS).double()
    kw = inputs()
    apply_nag(model, mode=mode, backend="torch")
    expected = reference(model, kw, mode=mode)
    counter = CompileCounter()
    compile_blocks(model, counter)
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)  # the second step reuses the graphs
    assert counter.frame_count <= most_graphs, f"{counter.frame_count} graphs for {2 * LAYERS} blocks"
    remove_nag(model)
    plain = run(model, positive(kw))  # the compiled blocks now run the stock forward again
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(plain, reference(model, positive(kw), nag_scale=1.0), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "mode, dynamic",
    [("exact", False), pytest.param("exact", True, marks=pytest.mark.slow), ("fast", None)],
    ids=["exact-static", "exact-dynamic", "fast-auto"],
)
def test_changing_nag_scale_tau_alpha_recompiles_at_most_once_under_fullgraph(mode, dynamic):
    # A UI slider moves nag_scale / nag_tau / nag_alpha between calls: under fullgraph=True each block class may
    # compile once more (the floats become symbolic), never once per value, and never crash.
    torch._dynamo.reset()
    model = flux_toy.transformer(layers=2, single_layers=2).double()
    kw = inputs()
    apply_nag(model, mode=mode, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True, dynamic=dynamic)
    settings = [(5.0, 2.5, 0.25), (3.0, 2.5, 0.25), (7.5, 1.5, 0.5), (11.0, 3.5, 0.125)]
    for scale, tau, alpha in settings:
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        expected = reference(model, kw, mode=mode, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    first = 4 if mode == "exact" else 2  # graphs of the first call (see the test above)
    assert counter.frame_count <= 2 * first, f"{counter.frame_count} graphs for {len(settings)} settings"
