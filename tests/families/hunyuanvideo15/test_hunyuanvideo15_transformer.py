"""apply_nag on a HunyuanVideo15Transformer3DModel: the guided forward (text, masks, ByT5 text 2B rows; video,
timestep, image embeddings B) equals the independent float64 computation (hunyuanvideo15_reference) with both text
masks, rows without any ByT5 token, image-to-video and text-to-video image tokens and MeanFlow's timestep_r; plain
calls, nag_scale=1, negative == positive and calls past nag_end are the stock model; removal exact; errors; the
parallel refusal; gradient checkpointing; autograd against finite differences."""

from __future__ import annotations

import hunyuanvideo15_reference as reference
import hunyuanvideo15_toy as toy
import pytest
import torch
from diffusers.models import normalization
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.usefixtures("single_thread")

B, T1, T2 = 2, 10, 6
TEXT_ROWS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")
STRONG = {"nag_scale": 12.0, "nag_tau": 1.5, "nag_alpha": 0.5}


def inputs(batch=B, image="i2v", seed=0, timestep=600.0):
    """A guided call's arguments: every text row its own padding (the NAG-negative rows shorter), one ByT5 row
    without any valid token (a prompt without quoted text), ``image``: "i2v" (SigLIP tokens) or "t2v" (zeros)."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch
    mask, mask_2 = torch.zeros(rows, T1), torch.zeros(rows, T2)
    for row in range(rows):
        mask[row, : (T1, 7, 3, 5, 8, 2)[row % 6]] = 1
        mask_2[row, : (6, 0, 2, 4, 1, 3)[row % 6]] = 1

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(
        hidden_states=randn(batch, 2 * toy.LATENT_CHANNELS + 1, 2, 2, 3),
        timestep=torch.full((batch,), timestep, dtype=torch.float64),
        encoder_hidden_states=randn(rows, T1, toy.TEXT_DIM),
        encoder_attention_mask=mask.double(),
        encoder_hidden_states_2=randn(rows, T2, toy.BYT5_DIM),
        encoder_attention_mask_2=mask_2.double(),
        image_embeds=randn(batch, toy.IMAGE_TOKENS, toy.VISION_DIM) * (image == "i2v"),
    )


def positive(kw):
    batch = kw["hidden_states"].shape[0]
    return {k: (v[:batch] if k in TEXT_ROWS else v) for k, v in kw.items()}


def run(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)[0]


def expected(model, kw, **nag):
    with torch.no_grad():
        return reference.forward(model, **kw, **nag)


@pytest.mark.parametrize("image", ["i2v", "t2v"])
def test_guided_forward_equals_the_independent_computation(image):
    model = toy.transformer().double()
    kw = inputs(image=image)
    plain = run(model, positive(kw))
    torch.testing.assert_close(plain, expected(model, positive(kw)), rtol=0, atol=1e-10)
    apply_nag(model, backend="torch")
    for call in ({}, STRONG):
        out = run(model, kw, **call)
        assert out.shape == plain.shape
        torch.testing.assert_close(out, expected(model, kw, **call), rtol=0, atol=1e-10)
        assert (out - plain).abs().max() > 1e-4
    torch.testing.assert_close(model(**kw).sample, expected(model, kw), rtol=0, atol=1e-10)  # return_dict=True


def test_l2_norm_and_timestep_r_of_meanflow_checkpoints():
    model = apply_nag(toy.transformer(meanflow=True).double(), norm="l2", backend="torch", **STRONG)
    kw = {**inputs(), "timestep_r": torch.full((B,), 250.0, dtype=torch.float64)}
    out = run(model, kw)
    torch.testing.assert_close(out, expected(model, kw, norm="l2", **STRONG), rtol=0, atol=1e-10)
    assert not torch.allclose(out, run(model, {**kw, "timestep_r": None}))  # timestep_r reaches the modulation


def test_already_doubled_timestep_and_image_embeds_and_batch_one():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = inputs()
    doubled = {**kw, "timestep": torch.cat([kw["timestep"]] * 2), "image_embeds": torch.cat([kw["image_embeds"]] * 2)}
    torch.testing.assert_close(run(model, doubled), expected(model, kw), rtol=0, atol=1e-10)
    one = inputs(batch=1, seed=3)
    torch.testing.assert_close(run(model, one), expected(model, one), rtol=0, atol=1e-10)


def test_unsplit_path_under_another_attention_backend_is_the_same_computation():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = inputs()
    want = expected(model, kw)
    for name, processor in model.attn_processors.items():
        if name.startswith("transformer_blocks."):
            processor.backend_is_torch = lambda: False  # as under flash-attn / sage: one attention per branch
    torch.testing.assert_close(run(model, kw), want, rtol=0, atol=1e-10)


def test_off_cases_and_remove_are_the_stock_model():
    model = toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, positive(kw)), plain)
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    same = {**kw, **{name: torch.cat([kw[name][:B]] * 2) for name in TEXT_ROWS}}
    torch.testing.assert_close(run(model, same), plain, rtol=0, atol=1e-12)
    # nag_end: on while t >= (1 - end) * 1000; at t = 600 with end 0.3 it is off: the plain forward, bit for bit
    assert torch.equal(run(model, kw, nag_end=0.3), plain)
    assert not torch.equal(run(model, kw, nag_end=0.5), plain)
    blocks = [name for name in processors if name.startswith("transformer_blocks.")]
    assert all(type(model.attn_processors[name].inner) is HunyuanVideo15AttnProcessor2_0 for name in blocks)
    assert all(type(p) is AttnProcessor2_0 for name, p in model.attn_processors.items() if name not in blocks)
    remove_nag(model)
    assert model.attn_processors == processors
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, positive(kw)), plain)


def test_bad_input_gets_clear_errors():
    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_attention_mask_2 must have batch 4"):
        run(model, {**kw, "encoder_attention_mask_2": kw["encoder_attention_mask_2"][:B]})
    with pytest.raises(ValueError, match="encoder_hidden_states_2 must have batch 4"):
        run(model, {**kw, "encoder_hidden_states_2": kw["encoder_hidden_states_2"][:B]})
    with pytest.raises(ValueError, match="encoder_hidden_states must have the batch of hidden_states"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:3]})
    with pytest.raises(ValueError, match="encoder_attention_mask must have the shape"):
        run(model, {**kw, "encoder_attention_mask": kw["encoder_attention_mask"][:, :4]})
    with pytest.raises(ValueError, match="encoder_hidden_states_2 and encoder_attention_mask_2 are required"):
        run(model, {**kw, "encoder_attention_mask_2": None})
    with pytest.raises(ValueError, match="image_embeds is required"):
        run(model, {**kw, "image_embeds": None})
    with pytest.raises(ValueError, match="image_embeds must have one row per video sample .2. or 4 .*"
                                         "num_videos_per_prompt=1"):
        run(model, {**kw, "image_embeds": kw["image_embeds"][:1]})
    with pytest.raises(ValueError, match="timestep must have batch 2 or 4"):
        run(model, {**kw, "timestep": kw["timestep"][:1].expand(3)})
    with pytest.raises(ValueError, match="hidden_states must be"):
        run(model, {**kw, "hidden_states": kw["hidden_states"].flatten(2)})
    torch.testing.assert_close(run(model, kw), expected(model, kw), rtol=0, atol=1e-10)  # nothing left behind


def test_a_parallel_config_is_refused_on_guided_calls():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = apply_nag(toy.transformer().double(), backend="torch")
    kw = inputs()
    plain = run(model, positive(kw))
    assert getattr(type(model), "_cp_plan", None) is None  # diffusers 0.42.1 has no CP plan for this model
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    processor = model.transformer_blocks[1].attn.processor
    processor._parallel_config = config  # what enable_parallelism sets on the processors
    with pytest.raises(NotImplementedError, match="NAG cannot guide this call under diffusers' parallelism"):
        run(model, kw)
    processor._parallel_config = None
    model._parallel_config = config  # ... and on the model
    with pytest.raises(NotImplementedError, match="no context-parallel plan .* for HunyuanVideo15Transformer3DModel"):
        run(model, kw)
    model._parallel_config = None
    torch.testing.assert_close(run(model, kw), expected(model, kw), rtol=0, atol=1e-10)
    assert torch.equal(run(model, positive(kw)), plain)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_guided_forward():
    """The checkpointed blocks are recomputed in backward, after the guided forward: the core binds its record to
    their calls (guided.carry_record_into_checkpoints), so the gradients are those without checkpointing."""
    model = apply_nag(toy.transformer().double().train(), backend="torch")
    kw = inputs(batch=1)

    def grads():
        x = kw["hidden_states"].clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(**{**kw, "hidden_states": x}, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), x.grad, model.transformer_blocks[1].attn.add_k_proj.weight.grad.clone()

    want = grads()
    model.enable_gradient_checkpointing()
    for got, expect in zip(grads(), want):
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


# -- autograd --------------------------------------------------------------------------------------------------------

STEP = 1e-3
NAG = dict(nag_scale=8.0, nag_tau=1.5, nag_alpha=0.5, norm="l2")  # L2: central differences across L1's kinks fail


@pytest.fixture
def float64_throughout(monkeypatch):
    """diffusers rotates (RoPE) and takes RMS norms' mean square in float32 even in float64: lift those steps to
    float64 (the NAG code untouched) so that finite differences resolve the gradient to ~1e-8."""
    float32 = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float32(self, *args, **kwargs)

    def rms_norm(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight if self.weight is not None else x

    monkeypatch.setattr(torch.Tensor, "float", keep_float64)
    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_norm)


def test_guided_forward_backpropagates_the_finite_difference_gradient(float64_throughout):
    model = apply_nag(toy.transformer().double(), backend="torch", **NAG)
    kw = inputs(batch=1)
    weight = model.transformer_blocks[1].attn.add_k_proj.weight  # text keys reach the loss through the LSE merge
    text = kw.pop("encoder_hidden_states")

    def forward(x, t):
        return model(hidden_states=x, encoder_hidden_states=t, **{k: v for k, v in kw.items() if k != "hidden_states"},
                     return_dict=False)[0]

    x, t = kw["hidden_states"].clone().requires_grad_(), text.clone().requires_grad_()
    out = forward(x, t)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), (x, t, weight))
    # the same gradient through the independent implementation
    x_ref, t_ref = x.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref_out = reference.forward(model, **{**kw, "hidden_states": x_ref, "encoder_hidden_states": t_ref},
                                **{k: v for k, v in NAG.items()})
    ref_grads = torch.autograd.grad((ref_out * w).sum(), (x_ref, t_ref, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)

    g = torch.Generator().manual_seed(2)
    directions = [tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in (x, t, weight)) for _ in range(3)]

    def central(d, step):
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                weight.add_(sign * step * d[2])
                values.append((forward(x + sign * step * d[0], t + sign * step * d[1]) * w).sum())
                weight.sub_(sign * step * d[2])
        return (values[0] - values[1]) / (2 * step)

    numeric = torch.stack([(4 * central(d, STEP / 2) - central(d, STEP)) / 3 for d in directions])
    analytic = torch.stack([sum((grad * e).sum() for grad, e in zip(grads, d)) for d in directions])
    error = ((analytic - numeric).abs() / numeric.abs()).max().item()
    assert error < 1e-6, f"relative error {error:.2e}: {analytic.tolist()} vs {numeric.tolist()}"
