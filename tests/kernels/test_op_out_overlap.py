"""``out=`` that shares memory with the inputs, on every op that takes it and both backends (Triton through the
interpreter): the same view as an input is computed in place; any other overlap gives the reference result (computed
into a temporary, then copied); an ``out`` whose own elements overlap (``expand``) is refused, naming ``out``.

Widths are chosen so that the Triton kernels run one token per program (``combine.launch_config(4096, .)`` has
``ROWS = 1``; ``merge.launch_config(8, 512, .)`` has ``TOKENS = 1``): a program that wrote the next token's input
before another program read it would show here.
"""

import pytest
import torch

from nag_kernels import nag, nag_merge, nag_merge_reference, nag_partial_norms, nag_reference, nag_with_norms
from nag_kernels.checks import may_self_overlap, overlaps_other_than_alias
from nag_kernels.combine import launch_config as combine_config
from nag_kernels.merge import launch_config as merge_config

from test_nag import assert_matches

BACKENDS = ["triton", "torch"]
N, C = 4, 4096
H, D = 8, 512
SCALARS = (5.0, 2.5, 0.25)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_token_per_program():
    assert combine_config(C, N)["ROWS"] == 1 and not combine_config(C, N)["chunked"]
    assert merge_config(H, D, N)["TOKENS"] == 1


# --- nag ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1, -1, 2])
def test_nag_out_shifted_over_z_pos(backend, shift):
    """``out`` is ``z_pos`` moved by ``shift`` tokens in one buffer (the defect: max error 6.0 on Triton)."""
    buffer = randn(N + 4, C, seed=0)
    z_pos = buffer[2:2 + N]
    out = buffer[2 + shift:2 + shift + N]
    z_neg = randn(N, C, seed=1)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    assert nag(z_pos, z_neg, *SCALARS, out=out, backend=backend) is out
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_out_shifted_over_z_neg(backend):
    buffer = randn(N + 1, C, seed=2)
    z_pos, z_neg, out = randn(N, C, seed=3), buffer[:N], buffer[1:]  # each program writes the next token's z_neg
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    nag(z_pos, z_neg, *SCALARS, out=out, backend=backend)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_out_over_half_of_each_token(backend):
    """``out`` starts in the middle of ``z_pos``'s first token: every token overlaps two."""
    buffer = randn(N + 1, C, seed=4).flatten()
    z_pos = buffer[: N * C].view(N, C)
    out = buffer[C // 2: C // 2 + N * C].view(N, C)
    z_neg = randn(N, C, seed=5)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    nag(z_pos, z_neg, *SCALARS, out=out, backend=backend)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["z_pos", "z_neg"])
def test_nag_out_is_an_input(backend, target):
    """The same view (here a second view object of the same memory, as ``hidden[:, 1:]`` written twice): in place."""
    hidden = randn(2, N + 1, C, seed=6)
    z_neg = randn(2, N, C, seed=7)
    z_pos = hidden[:, 1:]
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    out = hidden[:, 1:] if target == "z_pos" else z_neg.view(2, N, C)
    assert not overlaps_other_than_alias(out, (z_pos, z_neg))
    nag(z_pos, z_neg, *SCALARS, out=out, backend=backend)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_out_with_a_zero_stride_is_refused(backend):
    z_pos, z_neg = randn(N, C, seed=8), randn(N, C, seed=9)
    out = torch.empty(C).expand(N, C)
    with pytest.raises(ValueError, match=r"out must not have overlapping elements, got strides \(0, 1\)"):
        nag(z_pos, z_neg, *SCALARS, out=out, backend=backend)
    with pytest.raises(ValueError, match="out must not have overlapping elements"):
        torch.ops.nag_kernels.nag_out(out, z_pos, z_neg, *SCALARS, "l1", backend)
    with pytest.raises(ValueError, match="out must not have overlapping elements"):  # the fake impl checks it too
        nag(z_pos.to("meta"), z_neg.to("meta"), 5.0, out=torch.empty(C, device="meta").expand(N, C))


def test_overlap_helpers():
    buffer = torch.zeros(10, 8)
    assert may_self_overlap(torch.zeros(8).expand(3, 8))
    assert may_self_overlap(buffer.as_strided((3, 8), (4, 1)))  # rows overlap by half
    for t in (buffer, buffer[::2], buffer.t(), buffer[:, :3], buffer.view(2, 5, 8).transpose(0, 1), buffer[:1]):
        assert not may_self_overlap(t)
    assert not overlaps_other_than_alias(buffer[:5], (buffer[5:],))  # disjoint halves
    assert overlaps_other_than_alias(buffer[:5], (buffer[4:9],))
    assert not overlaps_other_than_alias(buffer[2:7], (buffer[2:7], torch.zeros(5, 8)))  # the same view
    assert overlaps_other_than_alias(buffer[:, :4], (buffer[:, 4:],))  # interleaved: counted as overlap (safe)
    assert not overlaps_other_than_alias(torch.empty(0, 8), (buffer,))


# --- nag_merge -------------------------------------------------------------------------------------------------


def merge_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    o = [torch.randn(1, N, H, D, generator=g) for _ in range(3)]
    lse = [torch.randn(1, H, N, generator=g).mul(3).transpose(1, 2) for _ in range(3)]
    return [o[0], lse[0], o[1], lse[1], o[2], lse[2]]


def merge_reference(args):
    return nag_merge_reference(*[a.double() for a in args], *SCALARS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over", [0, 2, 4])
def test_nag_merge_out_shifted_over_an_input(backend, over):
    """``out`` is ``o_shared``, ``o_pos`` or ``o_neg`` moved on by one token in one buffer: each program writes the
    next token's input."""
    args = merge_inputs(seed=10)
    buffer = torch.cat([args[over], torch.zeros(1, 1, H, D)], dim=1)
    args[over] = buffer[:, :N]
    expected = merge_reference(args)
    out = buffer[:, 1:]
    assert nag_merge(*args, *SCALARS, out=out, backend=backend) is out
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [0, 2, 4])
def test_nag_merge_out_is_an_input(backend, target):
    args = merge_inputs(seed=11)
    expected = merge_reference(args)
    nag_merge(*args, *SCALARS, out=args[target], backend=backend)
    assert_matches(args[target], expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_merge_out_with_a_zero_stride_is_refused(backend):
    out = torch.empty(1, 1, H, D).expand(1, N, H, D)
    with pytest.raises(ValueError, match="out must not have overlapping elements"):
        nag_merge(*merge_inputs(seed=12), *SCALARS, out=out, backend=backend)


# --- nag_with_norms ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_with_norms_out_shifted_over_z_pos(backend):
    buffer = randn(N + 1, C, seed=13)
    z_pos, z_neg = buffer[:N], randn(N, C, seed=14)
    norms = nag_partial_norms(z_pos, z_neg, 5.0, backend=backend)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    out = buffer[1:]
    assert nag_with_norms(z_pos, z_neg, norms, *SCALARS, out=out, backend=backend) is out
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_with_norms_out_over_the_norms(backend):
    """The norms lie inside ``out``'s second token: writing it would change the norms of the tokens after it."""
    z_pos, z_neg = randn(N, C, seed=15), randn(N, C, seed=16)
    buffer = torch.zeros(N * C)
    norms = buffer[C: C + 2 * N].view(N, 2)
    norms.copy_(nag_partial_norms(z_pos, z_neg, 5.0, backend=backend))
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    out = buffer.view(N, C)
    nag_with_norms(z_pos, z_neg, norms, *SCALARS, out=out, backend=backend)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["z_pos", "z_neg"])
def test_nag_with_norms_out_is_an_input(backend, target):
    z_pos, z_neg = randn(N, C, seed=17), randn(N, C, seed=18)
    norms = nag_partial_norms(z_pos, z_neg, 5.0, backend=backend)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    out = z_pos if target == "z_pos" else z_neg
    nag_with_norms(z_pos, z_neg, norms, *SCALARS, out=out, backend=backend)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_with_norms_out_with_a_zero_stride_is_refused(backend):
    z_pos, z_neg = randn(N, C, seed=19), randn(N, C, seed=20)
    norms = nag_partial_norms(z_pos, z_neg, 5.0, backend=backend)
    with pytest.raises(ValueError, match="out must not have overlapping elements"):
        nag_with_norms(z_pos, z_neg, norms, *SCALARS, out=torch.empty(1, C).expand(N, C), backend=backend)


# --- through the registered ops and torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_through_the_op(backend):
    """Not the eager fast path: the registered out= op's real implementation applies the same rule."""
    buffer = randn(N + 1, C, seed=21)
    z_pos, z_neg = buffer[:N], randn(N, C, seed=22)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    torch.ops.nag_kernels.nag_out(buffer[1:], z_pos, z_neg, *SCALARS, "l1", backend)
    assert_matches(buffer[1:], expected, torch.float32)


def test_the_checked_triton_launcher_applies_the_rule():
    from nag_kernels.combine import nag_triton

    buffer = randn(N + 1, C, seed=25)
    z_pos, z_neg = buffer[:N], randn(N, C, seed=26)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS)
    assert nag_triton(z_pos, z_neg, *SCALARS, out=buffer[1:]) is not None
    assert_matches(buffer[1:], expected, torch.float32)
    with pytest.raises(ValueError, match="out must not have overlapping elements"):
        nag_triton(z_pos, z_neg, *SCALARS, out=torch.empty(1, C).expand(N, C))


def test_overlap_under_compile():
    torch._dynamo.reset()

    def step(hidden, z_neg):
        nag(hidden[:, :-1], z_neg, 5.0, out=hidden[:, 1:])
        return hidden * 1

    hidden, z_neg = randn(1, N + 1, C, seed=23), randn(1, N, C, seed=24)
    expected = hidden.clone().double()
    expected[:, 1:] = nag_reference(hidden[:, :-1].double(), z_neg.double(), 5.0)
    result = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden.clone(), z_neg)
    assert_matches(result, expected, torch.float32)
