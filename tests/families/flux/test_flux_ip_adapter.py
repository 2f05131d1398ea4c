"""IP-Adapters and NAG on FLUX.1: loading works before or after apply_nag, plain calls stay the stock computation,
and a NAG call with an IP-Adapter loaded fails at call time with a clear error (NAG guides the stock attention only).

``FluxTransformer2DModel._load_ip_adapter_weights`` is what ``pipe.load_ip_adapter`` calls once it has the weights; it
rebuilds every single block's processor as ``type(processor)()``, which failed on NAG's processor before.
"""

from __future__ import annotations

import pytest
import torch

import flux_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_flux_transformer import B, inputs, positive, run

pytestmark = pytest.mark.usefixtures("single_thread")

CLIP_DIM = 24  # the image encoder's embedding width (any)


def ip_adapter_state_dict(model) -> dict:
    """Random weights in the layout of a FLUX.1 IP-Adapter checkpoint: an image projection to 4 tokens of the
    text width, and K/V projections of those tokens for every double block."""
    g = torch.Generator().manual_seed(5)
    width, hidden = model.config.joint_attention_dim, model.inner_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2

    image_proj = {"proj.weight": rand(4 * width, CLIP_DIM), "proj.bias": rand(4 * width),
                  "norm.weight": 1 + rand(width), "norm.bias": rand(width)}
    ip_adapter = {}
    for i in range(len(model.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{i}.{name}.weight"] = rand(hidden, width)
            ip_adapter[f"{i}.{name}.bias"] = rand(hidden)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def image_embeds():
    return [torch.randn(B, 1, CLIP_DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64)]


def load(model, weights):
    model._load_ip_adapter_weights(weights, low_cpu_mem_usage=False)
    return model.double()


@pytest.mark.parametrize("order", ["load-then-apply", "apply-then-load"])
def test_ip_adapter_loads_either_side_of_apply_nag(order):
    weights = ip_adapter_state_dict(flux_toy.transformer())
    stock = load(flux_toy.transformer().double(), weights)
    expected = run(stock, positive(inputs()), ip_adapter_image_embeds=image_embeds())
    without = run(flux_toy.transformer().double(), positive(inputs()))
    assert (expected - without).abs().max() > 1e-6  # the adapter acts

    model = flux_toy.transformer().double()
    if order == "load-then-apply":
        apply_nag(load(model, weights), backend="torch")
    else:
        load(apply_nag(model, backend="torch"), weights)
    torch.testing.assert_close(
        run(model, positive(inputs()), ip_adapter_image_embeds=image_embeds()), expected, rtol=0, atol=0
    )
    with pytest.raises(RuntimeError, match="transformer_blocks.0.attn uses FluxIPAdapterAttnProcessor"):
        run(model, inputs(), ip_adapter_image_embeds=image_embeds())  # a NAG call (2B text rows)
    remove_nag(model)
    assert not any(type(p).__name__.startswith("NAG") for p in model.attn_processors.values())
    torch.testing.assert_close(
        run(model, positive(inputs()), ip_adapter_image_embeds=image_embeds()), expected, rtol=0, atol=0
    )


def test_nag_works_again_once_the_ip_adapter_is_replaced_by_stock_processors():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = apply_nag(load(flux_toy.transformer().double(), ip_adapter_state_dict(flux_toy.transformer())),
                      backend="torch")
    model.set_attn_processor(FluxAttnProcessor())  # what unloading an IP-Adapter leaves
    model.encoder_hid_proj = None
    with pytest.raises(RuntimeError, match="call apply_nag"):
        run(model, inputs())
    apply_nag(model, backend="torch")  # re-wraps the stock processors
    fresh = apply_nag(flux_toy.transformer().double(), backend="torch")
    torch.testing.assert_close(run(model, inputs()), run(fresh, inputs()), rtol=0, atol=0)
