"""NAG on Wan under diffusers' context parallelism (Ulysses, ring; degree 2, 2 CPU processes, float32).

Wan's ``_cp_plan`` splits the video tokens (and the RoPE tables, and TI2V's per-token timesteps) along the sequence
at the first block; the text is not split. NAG acts only in the text cross-attention ``attn2``, whose queries are the
rank's own video tokens with all heads and whose keys are the whole text of each branch on every rank, so the
per-branch attention and the per-token combine are local: the NAG processor attends without the parallel config,
as the stock one does for cross-attention. One launch runs every case and returns, per case, how far the parallel
output (rank 0's gathered output) is from the same patched model in one process and from the authors' computation
(``test_wan_transformer.authors_model``, float64, same weights), and how far NAG moved the output; and a
``WanPipeline`` call (CFG, NAG) with the transformer context-parallel against the same call in one process.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

import parallel_helpers as ph
import wan_toy

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        not hasattr(diffusers, "ContextParallelConfig"),
        reason=f"diffusers {diffusers.__version__} has no context parallelism (ContextParallelConfig)",
    ),
]

T = 8  # text tokens; the toy video has 2 x 2 x 2 = 8 tokens (split in 2)
TOL = 1e-6  # float32: the parallel run differs from one process by the order of its sums only
SCALE, TAU, ALPHA = 12.0, 1.2, 0.5  # strong enough that the tau clamp acts


def inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, *wan_toy.LATENT, generator=g),
        encoder_hidden_states=torch.randn(2 * batch, T, wan_toy.TEXT_DIM, generator=g),
        timestep=torch.full((batch,), 700.0),
    )


def positive(kw: dict) -> dict:
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: kw["hidden_states"].shape[0]]}


def forward(model, kw, **extra):
    with torch.no_grad():
        return model(**kw, attention_kwargs=extra or None, return_dict=False)[0]


def run_case(kind: str, batch: int, lse_backend: str) -> dict:
    """Diffs of the parallel NAG output from one process and from the authors' float64 computation."""
    from test_wan_transformer import authors_model

    from nag_kernels.integrations import apply_nag

    model = wan_toy.transformer()
    kw = inputs(batch)
    kw64 = {k: v.double() for k, v in kw.items()}
    expected = forward(authors_model(model, SCALE, TAU, ALPHA).double(), kw64).float()
    plain = forward(model, positive(kw))
    apply_nag(model, backend="torch")
    call = {"nag_scale": SCALE, "nag_tau": TAU, "nag_alpha": ALPHA}
    single = forward(model, kw, **call)
    if kind == "ring":
        model.set_attention_backend(lse_backend)
    model.enable_parallelism(config=ph.cp_config(kind))
    out = forward(model, kw, **call)
    split = model.blocks[0].attn1.processor._parallel_config is not None  # the self-attention did run context-parallel
    again = forward(model, positive(kw))  # a plain forward of the parallel patched model
    return {
        "single": (out - single).abs().max().item(),
        "single_reference": (single - expected).abs().max().item(),
        "reference": (out - expected).abs().max().item(),
        "nag_effect": (single - plain).abs().max().item(),
        "plain": (again - plain).abs().max().item(),
        "parallel": split,
    }


def run_pipeline() -> dict:
    """A WanPipeline call (CFG with a negative prompt, NAG) with the transformer Ulysses-parallel, against one
    process."""
    from nag_kernels.integrations import apply_nag

    pipe = apply_nag(wan_toy.pipeline(dtype=torch.float32), backend="torch")
    args = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES, num_inference_steps=2,
                max_sequence_length=wan_toy.SEQ_LEN, output_type="latent", guidance_scale=3.0,
                negative_prompt="static", nag_negative_prompt="blurry dog")

    def call(**extra):
        with torch.no_grad():
            return pipe("a red cat", generator=torch.Generator().manual_seed(0), **args, **extra).frames

    single, plain = call(), call(nag_scale=1.0)
    pipe.transformer.enable_parallelism(config=ph.cp_config("ulysses"))
    out = call()
    return {"single": (out - single).abs().max().item(), "nag_effect": (single - plain).abs().max().item()}


CASES = [("ulysses", 1), ("ulysses", 2), ("ring", 2)]  # (CP kind, batch)


def _worker(rank: int, world: int) -> dict:
    backend = ph.register_cpu_lse_backend()
    results = {case: run_case(*case, lse_backend=backend) for case in CASES}
    results["pipeline"] = run_pipeline()
    return results


@pytest.fixture(scope="module")
def results():
    return ph.launch(_worker)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[1]}")
def test_context_parallel_equals_one_process_and_the_authors_computation(results, case):
    result = results[case]
    assert result["parallel"], result
    assert result["nag_effect"] > 1e-3, result  # NAG moved the output: the equalities below are not vacuous
    assert result["single_reference"] < 2e-6, result  # the one-process float32 run is the float64 computation
    assert result["single"] < TOL, result
    assert result["reference"] < 2e-6, result
    assert result["plain"] < TOL, result


def test_wan_pipeline_call_with_a_context_parallel_transformer_equals_one_process(results):
    result = results["pipeline"]
    assert result["nag_effect"] > 1e-3, result
    assert result["single"] < 1e-5, result
