"""NAG-guided training with diffusers' gradient checkpointing: the checkpointed blocks are recomputed in backward,
after the guided forward is over (and, on GPUs, on the autograd engine's own thread). Families whose record travels
per thread (Wan, LTX-Video, HiDream-I1, Kandinsky 6) carry it into the recomputation: the gradients equal those without checkpointing."""

from __future__ import annotations

import pytest
import torch

import hidream_toy
import kandinsky6_toy
import ltx_toy
import wan_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_ltx_transformer import inputs as ltx_inputs
from test_wan_transformer import inputs as wan_inputs

# family -> (tiny model, guided inputs, a weight that only the guided attention reaches through the text)
CASES = {
    "wan": (wan_toy.transformer, wan_inputs, "attn2.to_k.weight"),
    "ltx": (ltx_toy.transformer, ltx_inputs, "attn2.to_k.weight"),
    "hidream": (hidream_toy.transformer, lambda: hidream_toy.inputs(2), "attn1.to_k_t.weight"),
    "kandinsky6": (kandinsky6_toy.transformer, kandinsky6_toy.inputs, "video_dec_block.cross_attention.to_key.weight"),
}


def _grads(model, kw, weight_name):
    latents = kw["hidden_states"].clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(**{**kw, "hidden_states": latents}, return_dict=False)[0]
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    weight = next(p for name, p in model.named_parameters() if name.endswith(weight_name))
    return out.detach(), latents.grad, weight.grad.clone()


@pytest.mark.parametrize("family", list(CASES))
def test_checkpointed_guided_gradients_equal_the_plain_ones(family):
    build, inputs, weight = CASES[family]
    model = apply_nag(build().double().train(), backend="torch")
    kw = inputs()
    expected = _grads(model, kw, weight)
    model.enable_gradient_checkpointing()
    got = _grads(model, kw, weight)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    remove_nag(model)
    assert "_nag_checkpoint_original" not in getattr(model._gradient_checkpointing_func, "__dict__", {})
    model.disable_gradient_checkpointing()
