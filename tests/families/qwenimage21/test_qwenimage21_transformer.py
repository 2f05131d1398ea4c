"""apply_nag on a QwenImage21Transformer2DModel: the guided forward (text and text mask 2B rows, everything else B)
equals the independent float64 definition (qwenimage21_reference: the 2B layout, block-causal prefixes, condition
images spliced in, text masks); the KV cache holds both branches and serves plain steps from its positive half;
plain calls and removal are the stock model; autograd; LoRA with regional compilation; bad input."""

from __future__ import annotations

import pytest
import torch

import qwenimage21_toy as toy  # first: it skips this module on a diffusers without Qwen-Image 2.1
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVCache,
)
from torch._dynamo.testing import CompileCounter

import qwenimage21_reference
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

N = toy.SIDE * toy.SIDE  # target tokens


def run(model, kw, kv_cache=None, kv_cache_mode=None, **nag):
    """The model's output for ``kw``; ``nag``: per-call settings (``nag_scale`` ...) through attention_kwargs."""
    with torch.no_grad():
        return model(**kw, attention_kwargs=nag or None, kv_cache=kv_cache, kv_cache_mode=kv_cache_mode,
                     return_dict=False)[0]


def reference(model, kw, **nag):
    with torch.no_grad():
        return qwenimage21_reference.qwenimage21_forward(model, **kw, **nag)


def close(actual, expected, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("layout", ["t2i", "cond"])
def test_guided_forward_equals_the_definition(layout, masked):
    model = toy.transformer().double()
    kw = toy.inputs(layout=layout, masked=masked)
    plain = run(model, toy.positive(kw))
    close(plain, reference(model, toy.positive(kw)))  # the reference is the stock model on plain calls
    apply_nag(model, backend="torch")
    for call in ({}, {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}):
        out = run(model, kw, **call)
        assert out.shape == plain.shape  # [B, P + N, C]: the positive prefix and the target, like a plain call
        close(out, reference(model, kw, **call))
        assert (out[:, -N:] - plain[:, -N:]).abs().max() > 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_batches_l2_and_no_causal_condition(batch):
    model = apply_nag(toy.transformer(causal_condition=batch == 1).double(), backend="torch", norm="l2")
    kw = toy.inputs(batch=batch, layout="cond", seed=batch)
    close(run(model, kw), reference(model, kw, norm="l2"))


def test_unsplit_path_under_another_attention_backend():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    expected = reference(model, kw)
    for processor in model.attn_processors.values():
        processor.backend_is_torch = lambda: False  # as under flash-attn / sage: the per-branch attention, unsplit
    close(run(model, kw), expected)


def test_off_cases_and_remove_are_the_stock_model():
    model = toy.transformer().double()
    kw = toy.inputs()
    plain = run(model, toy.positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, toy.positive(kw)), plain)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    late = {**kw, "timestep": torch.full_like(kw["timestep"], 0.2)}  # t = 200 < (1 - 0.5) * 1000: NAG off
    assert torch.equal(run(model, late, nag_end=0.5), run(model, toy.positive(late)))
    close(run(model, toy.same_negative(kw)), plain, atol=1e-12)
    assert all(type(p.inner) is QwenImage21AttnProcessor for p in model.attn_processors.values())
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks and not model._forward_hooks
    assert "forward" not in model.pos_embed.__dict__ and "forward" not in model.norm_out.__dict__
    assert torch.equal(run(model, toy.positive(kw)), plain)


@pytest.mark.parametrize("layout", ["t2i", "cond"])
def test_kv_cache_holds_both_branches_and_plain_steps_read_the_positive_half(layout):
    stock = toy.transformer().double()
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs(layout=layout)
    later = {**kw, "timestep": torch.full_like(kw["timestep"], 0.3),  # the same prefix, a later target
             "hidden_states": torch.cat([kw["hidden_states"][:, :-N], kw["hidden_states"][:, -N:] * 0.7], dim=1)}
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    close(run(model, kw, kv_cache=cache, kv_cache_mode="extract"), reference(model, kw))
    assert cache.get_layer(0).k.shape[0] == 2 * kw["hidden_states"].shape[0]  # both branches' prefixes
    out = run(model, later, kv_cache=cache, kv_cache_mode="cached")
    assert out.shape == (2, N, toy.CHANNELS)  # the target only, as a stock decoding step
    close(out, reference(model, later)[:, -N:])
    # NAG off at this step (nag_end): a plain forward on the guided cache reads its positive half
    off = run(model, later, nag_end=0.5, kv_cache=cache, kv_cache_mode="cached")
    stock_cache = QwenImage21KVCache(len(stock.transformer_blocks))
    run(stock, toy.positive(kw), kv_cache=stock_cache, kv_cache_mode="extract")
    expected = run(stock, toy.positive(later), kv_cache=stock_cache, kv_cache_mode="cached")
    close(off, expected, atol=1e-12)
    # a plain cache on the patched model is the stock one, bit for bit
    plain_cache = QwenImage21KVCache(len(model.transformer_blocks))
    assert torch.equal(run(model, toy.positive(kw), kv_cache=plain_cache, kv_cache_mode="extract"),
                       run(stock, toy.positive(kw)))
    assert torch.equal(run(model, toy.positive(later), kv_cache=plain_cache, kv_cache_mode="cached"), expected)
    with pytest.raises(RuntimeError, match="does not hold both branches' prefixes for 2 latent rows"):
        run(model, later, kv_cache=plain_cache, kv_cache_mode="cached")  # filled by a plain forward
    run(model, toy.positive(kw), kv_cache=cache, kv_cache_mode="extract")  # refilled plainly: a plain cache again
    assert torch.equal(run(model, toy.positive(later), kv_cache=cache, kv_cache_mode="cached"), expected)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = toy.transformer().double()
    kw = toy.inputs()
    expected, plain = reference(model, kw), run(model, toy.positive(kw))
    cpu = torch.device("cpu")
    steps = [lambda: model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level",
                                                num_blocks_per_group=1),
             lambda: apply_nag(model, backend="torch")]
    for step in steps if order == "offload-then-nag" else steps[::-1]:
        step()
    close(run(model, kw), expected)
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    run(model, kw, kv_cache=cache, kv_cache_mode="extract")
    close(run(model, kw, kv_cache=cache, kv_cache_mode="cached"), expected[:, -N:])
    remove_nag(model)
    assert torch.equal(run(model, toy.positive(kw)), plain)


def test_bad_input_gets_clear_errors():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = toy.inputs()
    mask = kw["encoder_hidden_states_mask"]
    with pytest.raises(ValueError, match="encoder_hidden_states_mask must have batch 4"):
        run(model, {**kw, "encoder_hidden_states_mask": mask[:2]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3], "encoder_hidden_states_mask": None})
    with pytest.raises(ValueError, match="img_mask must cover the joint sequence of the prompt's layout"):
        run(model, {**kw, "img_mask": kw["img_mask"][:, 1:]})
    with pytest.raises(ValueError, match="hidden_states must hold 24 tokens"):
        run(model, {**kw, "hidden_states": kw["hidden_states"][:, 1:]})
    with pytest.raises(ValueError, match="img_shapes must be a list"):
        run(model, {**kw, "img_shapes": []})
    with pytest.raises(ValueError, match="nag_scale must be >= 1"):
        run(model, kw, nag_scale=0.5)
    attn = model.transformer_blocks[1].attn
    attn.processor.inner = QwenImage21FlexAttnProcessor()
    with pytest.raises(NotImplementedError, match="transformer_blocks.1.attn uses QwenImage21FlexAttnProcessor"):
        run(model, kw)
    attn.processor.inner = QwenImage21AttnProcessor()
    attn.processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(NotImplementedError, match="NAG cannot guide this call under diffusers' parallelism"):
        run(model, kw)
    attn.processor._parallel_config = None
    model.enable_gradient_checkpointing()
    with pytest.raises(NotImplementedError, match="under gradient checkpointing with gradients on"):
        model(**kw)
    close(run(model, kw), reference(model, kw))  # under no_grad checkpointing does not run
    model.disable_gradient_checkpointing()
    close(run(model, kw), reference(model, kw))


def _finite_difference(f, x, dx, eps=1e-4):
    # eps well above the float32 rounding of the RoPE rotation and the RMS norms (diffusers computes them in float32)
    with torch.no_grad():
        return (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)


def test_autograd_matches_the_definition_and_finite_differences():
    model = apply_nag(toy.transformer(layers=1).double(), backend="torch")
    kw = toy.inputs(batch=1)
    weight = model.transformer_blocks[0].attn.to_k.weight
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(reference(model, kw).shape, generator=g, dtype=torch.float64)

    def loss(x, w=None, forward=None):
        original = weight.data.clone()
        if w is not None:
            weight.data.copy_(w)
        try:
            args = {**kw, "hidden_states": x}
            out = model(**args, return_dict=False)[0] if forward is None else forward(model, **args)
            return (out * probe).sum()
        finally:
            weight.data.copy_(original)

    grads = []
    for forward in (None, qwenimage21_reference.qwenimage21_forward):
        x = kw["hidden_states"].clone().requires_grad_(True)
        weight.grad = None
        loss(x, forward=forward).backward()
        grads.append((x.grad, weight.grad.clone()))
    (dx_nag, dw_nag), (dx_ref, dw_ref) = grads
    torch.testing.assert_close(dx_nag, dx_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(dw_nag, dw_ref, rtol=0, atol=1e-10)
    dx, dw = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (dx_nag, dw_nag))
    torch.testing.assert_close((dx_nag * dx).sum(), _finite_difference(loss, kw["hidden_states"], dx), rtol=1e-3,
                               atol=1e-7)
    torch.testing.assert_close((dw_nag * dw).sum(),
                               _finite_difference(lambda w: loss(kw["hidden_states"], w), weight.detach().clone(), dw),
                               rtol=1e-3, atol=1e-7)


def test_lora_and_regional_compilation_with_changing_settings():
    from peft import LoraConfig

    torch._dynamo.reset()
    model = toy.transformer(layers=10).double()  # more blocks than dynamo's recompile limit (8)
    model.add_adapter(LoraConfig(r=2, target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"],
                                 init_lora_weights=False))
    kw = toy.inputs()
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    graphs = []
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (9.0, 3.5, 0.5), (3.0, 1.5, 0.125)]:
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        close(out, reference(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha))  # LoRA layers in both
        graphs.append(counter.frame_count)
    assert graphs == [graphs[0]] * 3 and graphs[0] == 1, f"graphs after each call: {graphs}"
    close(run(model, toy.positive(kw)), reference(model, toy.positive(kw)))  # a plain call: one more graph
    assert counter.frame_count == 2
