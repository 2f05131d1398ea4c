"""NAG on a Wan transformer composes with diffusers' group offloading, applied before or after apply_nag, and
remove_nag leaves the offloaded model plain."""

from __future__ import annotations

import pytest
import torch

import wan_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_wan_transformer import authors_model, inputs, positive, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading(order):
    model = wan_toy.transformer().double()
    kw = inputs()
    expected, plain = run(authors_model(model), kw), run(model, positive(kw))
    cpu = torch.device("cpu")

    def offload(target=model):
        target.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    try:
        offload(wan_toy.transformer())
    except AttributeError:  # diffusers 0.35 asks torch.accelerator for a device, and a CPU-only machine has none
        pytest.skip("this diffusers' group offloading needs an accelerator")
    if order == "offload-then-nag":
        offload()
        apply_nag(model, backend="torch")
    else:
        apply_nag(model, backend="torch")
        offload()
    torch.testing.assert_close(run(model, kw), expected, rtol=0, atol=1e-10)
    remove_nag(model)
    torch.testing.assert_close(run(model, positive(kw)), plain, rtol=0, atol=0)
