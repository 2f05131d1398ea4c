"""apply_nag on SanaTransformer2DModel (Sana and Sana-Sprint) and SanaControlNetModel: the guided forward against the
independent float64 implementation (``sana_reference``) with a text mask per branch, batched CFG, the off cases,
removal, Sana-Sprint's nag_end, autograd and bad input.

The models compute their linear self-attention in float32 whatever their dtype; the reference does too, in its own
order of operations, so a float64 comparison holds to ~1e-8 (``ATOL``), where NAG moves the output by ~1e-2.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

import sana_reference
import sana_toy
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, sana_toy.SEQ_LEN
ATOL = 1e-7  # the float32 linear attention (module docstring)
SPRINT_T = 0.9  # an SCM timestep (1 = pure noise): 900 on the scheduler's scale


def inputs(rows=B, text_rows=2 * B, seed=0, sprint=False, timestep=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(text_rows, T)
    mask[torch.arange(text_rows), T - 1 - torch.arange(text_rows) % 3] = 0  # a different padding per text row
    mask[0, -3:] = 0
    kw = dict(
        hidden_states=torch.randn(rows, sana_toy.CHANNELS, 8, 8, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(text_rows, T, sana_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        timestep=torch.full((rows,), timestep or (SPRINT_T if sprint else 700.0), dtype=torch.float64),
        encoder_attention_mask=mask,
    )
    if sprint:
        kw["guidance"] = torch.full((rows,), 0.45, dtype=torch.float64)
    return kw


def plain_rows(kw, rows):
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:rows],
            "encoder_attention_mask": kw["encoder_attention_mask"][:rows]}


def run(model, kw, **attention_kwargs):
    with torch.no_grad():
        return model(**kw, attention_kwargs=attention_kwargs or None, return_dict=False)[0]


def reference(model, kw, **settings):
    with torch.no_grad():
        return sana_reference.sana_forward(model, **kw, **settings)


@pytest.mark.parametrize("sprint, cfg", [(False, False), (False, True), (True, False)],
                         ids=["sana", "sana-batched-cfg", "sprint"])  # Sana-Sprint has no CFG
def test_guided_forward_equals_the_definition_with_a_mask_per_branch(sprint, cfg):
    model = sana_toy.transformer(guidance=sprint).double()
    kw = inputs(2 * B, 3 * B, sprint=sprint) if cfg else inputs(sprint=sprint)
    rows = kw["hidden_states"].shape[0]
    plain = run(model, plain_rows(kw, rows))
    torch.testing.assert_close(plain, reference(model, plain_rows(kw, rows)), rtol=0, atol=ATOL)
    apply_nag(model, backend="torch")
    out = run(model, kw)
    torch.testing.assert_close(out, reference(model, kw), rtol=0, atol=ATOL)  # the recommended 5 / 2.5 / 0.25
    assert (out - plain)[rows - B:].abs().max() > 1e-3
    if cfg:
        assert torch.equal(out[:B], plain[:B])  # the unconditional rows run the stock computation
    out = run(model, kw, nag_scale=11.0, nag_tau=1.5, nag_alpha=0.5)
    torch.testing.assert_close(out, reference(model, kw, scale=11.0, tau=1.5, alpha=0.5), rtol=0, atol=ATOL)
    ones = {**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])}
    assert (run(model, ones, nag_scale=11.0, nag_tau=1.5, nag_alpha=0.5) - out).abs().max() > 1e-4  # masks count
    assert torch.equal(run(model, plain_rows(kw, rows)), plain)


def test_controlnet_is_guided_with_the_transformer():
    model, controlnet = sana_toy.transformer().double(), sana_toy.controlnet().double()
    kw = inputs()
    cond = torch.randn(B, sana_toy.CHANNELS, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        samples = sana_reference.sana_controlnet_forward(controlnet, **kw, controlnet_cond=cond, conditioning_scale=0.7)
    expected = reference(model, {**kw, "controlnet_block_samples": tuple(samples)})
    apply_nag(model, backend="torch")
    apply_nag(controlnet, backend="torch")
    with torch.no_grad():
        got = controlnet(**kw, controlnet_cond=cond, conditioning_scale=0.7, return_dict=False)[0]
    for a, b in zip(got, samples):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    torch.testing.assert_close(run(model, {**kw, "controlnet_block_samples": tuple(got)}), expected, rtol=0, atol=ATOL)


def test_off_cases_and_remove_are_the_stock_model():
    model = sana_toy.transformer().double()
    kw = inputs()
    plain = run(model, plain_rows(kw, B))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    assert torch.equal(run(model, kw, nag_end=0.25), plain)  # t = 700 < 750: NAG off at this step
    assert (run(model, kw, nag_end=0.3) - plain).abs().max() > 1e-3  # t = 700 >= 700: on
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "encoder_attention_mask": torch.cat([kw["encoder_attention_mask"][:B]] * 2)}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks and not model._forward_hooks
    assert not any(any(k.startswith("_nag") or k == "forward" for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, plain_rows(kw, B)), plain)


def test_sprint_nag_end_reads_the_scm_timestep_on_the_1000_scale():
    model = apply_nag(sana_toy.transformer(guidance=True).double(), backend="torch")
    for t, end, on in ((0.9, 0.25, True), (0.7, 0.25, False), (0.7, 0.3, True), (0.05, 1.0, True)):
        kw = inputs(sprint=True, timestep=t)
        plain, out = run(model, plain_rows(kw, B)), run(model, kw, nag_end=end)
        assert (not torch.equal(out, plain)) == on, (t, end)


def _finite_difference(f, x, direction, eps=1e-5):
    with torch.no_grad():
        return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


def test_autograd_matches_finite_differences():
    model = apply_nag(sana_toy.transformer(layers=1).double(), backend="torch")
    kw = inputs(1, 2)
    weight = model.transformer_blocks[0].attn2.to_k.weight
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(kw["hidden_states"].shape, generator=g, dtype=torch.float64)

    def loss_of_latents(x):
        return (model(**{**kw, "hidden_states": x}, return_dict=False)[0] * probe).sum()

    def loss_of_weight(w):
        original = weight.data.clone()
        weight.data.copy_(w)
        try:
            return loss_of_latents(kw["hidden_states"])
        finally:
            weight.data.copy_(original)

    x = kw["hidden_states"].clone().requires_grad_(True)
    loss_of_latents(x).backward()
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    # float32 inside the linear attention: finite differences hold to ~1e-4 relative
    torch.testing.assert_close((x.grad * dx).sum(), _finite_difference(loss_of_latents, x.detach(), dx), rtol=1e-3,
                               atol=1e-6)
    model.zero_grad()
    loss_of_latents(kw["hidden_states"]).backward()
    dw = torch.randn(weight.shape, generator=g, dtype=torch.float64)
    expected = _finite_difference(loss_of_weight, weight.detach().clone(), dw)
    torch.testing.assert_close((weight.grad * dw).sum(), expected, rtol=1e-3, atol=1e-6)
    assert weight.grad.abs().max() > 0


def test_bad_input_gets_clear_errors_and_the_model_stays_usable():
    model = apply_nag(sana_toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_attention_mask must have batch 4"):
        run(model, {**kw, "encoder_attention_mask": kw["encoder_attention_mask"][:B]})
    with pytest.raises(ValueError, match="encoder_hidden_states must be \\[2B, T, caption_channels=32\\]"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :16]})
    with pytest.raises(ValueError, match="encoder_attention_mask must have the 8 tokens"):
        run(model, {**kw, "encoder_attention_mask": kw["encoder_attention_mask"][:, :5]})
    with pytest.raises(ValueError, match="timestep must have the batch of hidden_states \\(2\\) in a NAG call, got 4"):
        run(model, {**kw, "timestep": torch.cat([kw["timestep"]] * 2)})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"]] * 2)[:5]})
    with pytest.raises(ValueError, match="encoder_attention_mask must have one row per row of encoder_hidden_states "
                                         "\\(3\\), got 4"):  # 3 text rows for 2 latent rows: batched CFG
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    model.transformer_blocks[1].attn2.set_processor(SanaAttnProcessor2_0())
    with pytest.raises(RuntimeError, match="transformer_blocks.1.attn2 uses SanaAttnProcessor2_0"):
        run(model, kw)
    apply_nag(model, backend="torch")
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=ATOL)


def test_a_guided_call_under_a_parallel_config_is_refused():
    """diffusers has no context-parallel plan for Sana. ``enable_parallelism`` needs a process group, so the config
    is set where it leaves it (the model's ``_parallel_config``, each processor's ``_parallel_config``)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = apply_nag(sana_toy.transformer().double(), backend="torch")
    kw = inputs()
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model._parallel_config = config
    with pytest.raises(NotImplementedError, match="NAG cannot guide this SanaTransformer2DModel under diffusers' "
                                                  "parallelism"):
        run(model, kw)
    model._parallel_config = None
    model.transformer_blocks[0].attn2.processor._parallel_config = config
    cfg = inputs(2 * B, 3 * B)  # batched CFG: refused in the processor
    with pytest.raises(NotImplementedError, match="parallelism"):
        run(model, cfg)
    assert run(model, plain_rows(kw, B)).shape == (B, sana_toy.CHANNELS, 8, 8)  # plain calls stay stock
    model.transformer_blocks[0].attn2.processor._parallel_config = None
    torch.testing.assert_close(run(model, kw), reference(model, kw), rtol=0, atol=ATOL)


def test_whole_model_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = sana_toy.transformer().double()
    kw = inputs()
    expected = reference(model, kw)
    apply_nag(model, backend="torch")
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the caption patches trace too
    torch.testing.assert_close(run(compiled, kw), expected, rtol=0, atol=ATOL)
