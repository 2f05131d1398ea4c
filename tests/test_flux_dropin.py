"""The usage block of the authors' README runs with only its import lines changed (on tiny offline weights)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from diffusers import FluxPipeline

import flux_toy

README = pathlib.Path("/work/shared/seed-NAG-README.md")


def _usage_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return blocks[:2]  # "Loading Custom Pipeline" and "Sampling with NAG"


@pytest.mark.skipif(not README.exists(), reason="the authors' README is not in this checkout")
def test_authors_usage_block_runs_with_only_imports_changed(tmp_path):
    pipe = flux_toy.pipeline(FluxPipeline, dtype=torch.float32)
    pipe.save_pretrained(tmp_path)
    load, sample = _usage_blocks()
    code = load.replace("from src.pipeline_flux_nag import", "from nag_kernels.integrations import")
    code = code.replace("from src.transformer_flux import", "from nag_kernels.integrations import")
    # What is not the import lines: the weights (local tiny ones) and the device (no GPU here).
    code = code.replace('"black-forest-labs/FLUX.1-schnell"', repr(str(tmp_path))).replace('"cuda"', '"cpu"')
    assert "src." not in code
    namespace: dict = {}
    exec(compile(code, "seed-NAG-README.md", "exec"), namespace)
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 16  # a 32x32 default image instead of 256x256 with this tiny VAE (CPU time)
    exec(compile(sample, "seed-NAG-README.md", "exec"), namespace)
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.transformer._nag_state.config.scale == 5.0
    assert namespace["image"].size == (32, 32)
