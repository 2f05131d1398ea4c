"""The op factory (``nag_kernels.op_factory``): every op it generated passes ``torch.library.opcheck`` (enumerated from
its registry, so a new op is covered without a new test), the public functions have the declared signatures
(``norm``, ``out``, ``backend`` keyword-only; the old positional forms still work with a DeprecationWarning), and
eager calls on plain tensors do not go through the dispatcher."""

import inspect
import warnings

import pytest
import torch

from nag_kernels import nag, nag_partial_norms, nag_reference, nag_with_norms
from nag_kernels.op_factory import NAMESPACE, REGISTRY, define

BACKENDS = ["triton", "torch"]
SCALAR_VALUES = {"scale": 5.0, "tau": 2.5, "alpha": 0.25}
VARIANTS = [(name, variant) for name, op in sorted(REGISTRY.items()) for variant in op.variants]


def variant_args(op, variant, norm, backend):
    tensors = op.spec.example()
    scalars = [SCALAR_VALUES[n] for n in op.spec.scalars]
    if variant.endswith("_scalar_tensors"):
        scalars = [torch.tensor(v, dtype=torch.float64) for v in scalars]
    out = [torch.empty_like(tensors[op.main_index])] if variant.startswith(op.spec.name + "_out") else []
    return (*out, *tensors, *scalars, norm, backend)


def test_the_registry_holds_every_op_of_the_namespace():
    registered = {variant for op in REGISTRY.values() for variant in op.variants}
    namespace = getattr(torch.ops, NAMESPACE)
    assert {name for name in dir(namespace) if hasattr(getattr(namespace, name, None), "default")} == registered
    assert {"nag", "nag_merge", "nag_partial_norms", "nag_with_norms"} <= set(REGISTRY)
    assert len(registered) == 14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", VARIANTS, ids=[v for _, v in VARIANTS])
def test_opcheck(name, variant, backend):
    op = REGISTRY[name]
    norm = "l2" if variant.endswith("_scalar_tensors") else "l1"  # both norms over the variants
    torch.library.opcheck(op.variants[variant], variant_args(op, variant, norm, backend))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_public_signatures(name):
    op = REGISTRY[name]
    params = inspect.signature(op.public_function).parameters
    assert list(params) == [*op.spec.tensors, *op.spec.scalars, "norm", *(["out"] if op.spec.has_out else []),
                            "backend"]
    for keyword in ("norm", "out", "backend"):
        if keyword in params:
            assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["scale"].default is inspect.Parameter.empty
    if "tau" in params:
        assert (params["tau"].default, params["alpha"].default) == (2.5, 0.25)


def test_a_public_function_must_have_the_declared_signature():
    with pytest.raises(TypeError, match="must have the signature"):
        REGISTRY["nag"].public(lambda z_pos, z_neg, scale, tau=2.5, alpha=0.25, norm="l1", out=None, backend="auto": 0)
    with pytest.raises(RuntimeError, match="defined twice"):
        define(REGISTRY["nag"].spec)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_eager_plain_tensors_skip_the_dispatcher(name, monkeypatch):
    op = REGISTRY[name]

    def dispatched(*args):
        raise AssertionError("an eager call on plain tensors went through torch.library")

    for attr in ("_op", "_op_out", "_op_st", "_op_out_st"):
        monkeypatch.setattr(op, attr, dispatched)
    tensors = op.spec.example()
    op.public_function(*tensors, 5.0)
    if op.spec.has_out:
        out = torch.empty_like(tensors[op.main_index])
        assert op.public_function(*tensors, 5.0, out=out) is out


def example_pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)


def test_comfyui_positional_order_without_warning():
    z_pos, z_neg = example_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = nag(z_pos, z_neg, 5.0, 2.5, 0.25)
        nag_with_norms(z_pos, z_neg, nag_partial_norms(z_pos, z_neg, 5.0, norm="l2"), 5.0, 2.5, 0.25, norm="l2")
    torch.testing.assert_close(out.double(), nag_reference(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25))


def test_positional_norm_and_out_still_work_with_a_deprecation_warning():
    z_pos, z_neg = example_pair()
    with pytest.deprecated_call(match=r"nag_partial_norms\(\): passing norm positionally is deprecated"):
        sums = nag_partial_norms(z_pos, z_neg, 5.0, "l2")
    torch.testing.assert_close(sums, nag_partial_norms(z_pos, z_neg, 5.0, norm="l2"))
    out = torch.empty_like(z_pos)
    with pytest.deprecated_call(match=r"nag_with_norms\(\): passing norm, out positionally .* pass norm=, out="):
        result = nag_with_norms(z_pos, z_neg, sums, 5.0, 2.5, 0.25, "l2", out)
    assert result is out
    torch.testing.assert_close(out, nag_with_norms(z_pos, z_neg, sums, 5.0, 2.5, 0.25, norm="l2"))
    with pytest.deprecated_call(match="passing norm positionally"):
        nag_with_norms(z_pos, z_neg, sums, 5.0, 2.5, 0.25, "l2", out=out)


def test_bad_positional_calls():
    z_pos, z_neg = example_pair()
    sums = nag_partial_norms(z_pos, z_neg, 5.0)
    with pytest.raises(TypeError, match="takes at most 3 positional arguments"):
        nag_partial_norms(z_pos, z_neg, 5.0, "l1", "torch")
    with pytest.raises(TypeError, match="multiple values for argument 'norm'"):
        nag_with_norms(z_pos, z_neg, sums, 5.0, 2.5, 0.25, "l1", norm="l2")
    with pytest.raises(TypeError):  # nag never took norm positionally
        nag(z_pos, z_neg, 5.0, 2.5, 0.25, "l2")


def test_positional_norm_under_compile():
    torch._dynamo.reset()
    z_pos, z_neg = example_pair()
    compiled = torch.compile(lambda a, b: nag_partial_norms(a, b, 5.0, "l2"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z_pos, z_neg), nag_partial_norms(z_pos, z_neg, 5.0, norm="l2"))
