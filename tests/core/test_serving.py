"""NAG served: one set of weights, one pipeline per request, several requests at once, each with its own settings.

Every concurrent result must equal the same call run alone (sequentially, on a fresh pipeline over the same
components); pipelines sharing a transformer keep their own settings; a refused ``apply_nag`` leaves nothing patched.
FLUX.1 passes the guided forward's record through its attention kwargs, Wan per thread (``call_state``): both are
covered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, WanPipeline

import flux_toy
import wan_toy
from nag_kernels.integrations import apply_nag, call_state, install, nag, remove_nag

THREADS = 4
CALLS = {"flux": 6, "wan": 2}  # per thread; Wan's passes the per-thread record path, FLUX.1 carries the full load
NEGATIVES = ["blurry", "low quality", "glasses", "dark"]
# Concurrent float64 results equal the sequential ones up to rounding: PyTorch's intra-op parallelism may split a
# reduction differently when several threads call into it (a stock pipeline differs by up to ~4e-16 the same way).
TOL = 1e-10


def _request(index: int) -> dict:
    """Call ``index``'s own NAG settings and negative (all different)."""
    return dict(
        nag_negative_prompt=NEGATIVES[index % len(NEGATIVES)],
        nag_scale=2.0 + index,
        nag_tau=1.5 + 0.25 * (index % 5),
        nag_alpha=0.2 + 0.05 * (index % 4),
    )


class Served:
    """Shared components of one family, a request-scoped pipeline per call (its own scheduler)."""

    def __init__(self, family: str):
        self.family = family
        if family == "flux":
            self.cls, self.parts = FluxPipeline, flux_toy.components()
            self.common = dict(height=flux_toy.SIZE, width=flux_toy.SIZE, num_inference_steps=2,
                               max_sequence_length=flux_toy.SEQ_LEN, guidance_scale=0.0, output_type="latent")
        else:
            self.cls, self.parts = WanPipeline, wan_toy.components()
            self.common = dict(height=wan_toy.SIZE, width=wan_toy.SIZE, num_frames=wan_toy.FRAMES,
                               num_inference_steps=2, max_sequence_length=wan_toy.SEQ_LEN, guidance_scale=1.0,
                               output_type="latent")
        for part in self.parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(torch.float64).eval()

    def pipeline(self):
        # What a server shares is the models; the scheduler and the tokenizers are per request (a fast tokenizer
        # switches its truncation and padding settings on every call, which is not thread-safe in a stock pipeline
        # either, as diffusers' request-scoped server example notes).
        own = {name: copy.deepcopy(part) for name, part in self.parts.items() if name.startswith("tokenizer")}
        pipe = self.cls(**{**self.parts, **own, "scheduler": FlowMatchEulerDiscreteScheduler()})
        pipe.set_progress_bar_config(disable=True)
        return apply_nag(pipe, backend="torch")

    def latents(self, index: int) -> torch.Tensor:
        toy = flux_toy if self.family == "flux" else wan_toy
        return toy.latents(1, seed=index)

    def call(self, index: int) -> torch.Tensor:
        out = self.pipeline()(f"a cat {index}", latents=self.latents(index), **self.common, **_request(index))
        return out.images if self.family == "flux" else out.frames


@pytest.fixture(params=["flux", "wan"])
def served(request):
    return Served(request.param)


def test_concurrent_threads_each_get_their_sequential_result(served):
    indices = list(range(THREADS * CALLS[served.family]))
    with torch.no_grad():
        expected = {i: served.call(i) for i in indices}
        results, errors = {}, []

        def worker(mine):
            try:
                for i in mine:
                    results[i] = served.call(i)
            except BaseException as err:  # reported below, with the thread's traceback
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(indices[t::THREADS],)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    for i in indices:  # float64: a call with another call's settings is off by ~1e-3; rounding alone by ~1e-16
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=TOL, msg=f"call {i} differs")
    assert call_state.call_config() is None and call_state.record() is None


def test_asyncio_tasks_in_an_executor_each_get_their_sequential_result(served):
    indices = list(range(2 * THREADS))
    with torch.no_grad():
        expected = {i: served.call(i) for i in indices}

    async def serve():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:

            def run(i):
                with torch.no_grad():
                    return served.call(i)

            return await asyncio.gather(*(loop.run_in_executor(pool, run, i) for i in indices))

    for i, out in zip(indices, asyncio.run(serve())):
        torch.testing.assert_close(out, expected[i], rtol=0, atol=TOL, msg=f"task {i} differs")


def _flux_pipelines():
    parts = flux_toy.components()
    pipes = []
    for _ in range(2):
        pipe = FluxPipeline(**{**parts, "scheduler": FlowMatchEulerDiscreteScheduler()})
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe.to(torch.float64))
    return pipes


FLUX_CALL = dict(height=flux_toy.SIZE, width=flux_toy.SIZE, num_inference_steps=2, guidance_scale=0.0,
                 max_sequence_length=flux_toy.SEQ_LEN, output_type="latent", nag_negative_prompt="blurry")


def _run(pipe, **kw):
    with torch.no_grad():
        return pipe("a cat", latents=flux_toy.latents(1), **{**FLUX_CALL, **kw}).images


def test_settings_are_per_pipeline_when_pipelines_share_a_transformer():
    pipe1, pipe2 = _flux_pipelines()
    apply_nag(pipe1, nag_scale=3.0, backend="torch")
    at_3 = _run(pipe1)
    apply_nag(pipe2, nag_scale=9.0, backend="torch")
    assert torch.equal(_run(pipe1), at_3)  # pipe2's apply_nag did not reset pipe1's settings
    at_9 = _run(pipe2)
    assert not torch.equal(at_9, at_3)
    remove_nag(pipe2)  # pipe1 still uses the shared transformer with NAG
    assert type(pipe2) is FluxPipeline and torch.equal(_run(pipe1), at_3)
    remove_nag(pipe1)
    assert not hasattr(pipe1.transformer, "_nag_state")  # the last owner released it


def test_the_context_manager_on_a_second_pipeline_leaves_the_first_alone():
    pipe1, pipe2 = _flux_pipelines()
    apply_nag(pipe1, nag_scale=3.0, backend="torch")
    at_3 = _run(pipe1)
    with nag(pipe2, nag_scale=9.0, backend="torch"):
        assert torch.equal(_run(pipe1), at_3)  # pipe1's scale during the block
        inside = _run(pipe2)
    assert type(pipe2) is FluxPipeline  # pipe2 is the stock pipeline again
    assert torch.equal(_run(pipe1), at_3)
    apply_nag(pipe2, nag_scale=9.0, backend="torch")
    assert torch.equal(_run(pipe2), inside)
    remove_nag(pipe1)
    remove_nag(pipe2)
    assert not hasattr(pipe1.transformer, "_nag_state")


def test_a_refused_apply_leaves_nothing_patched(monkeypatch):
    pipe = wan_toy.pipeline(two_experts=True)
    stock = install.install

    def refuse_the_second_expert(family, model):
        if model is pipe.transformer_2:
            raise ValueError("refused for the test")
        return stock(family, model)

    monkeypatch.setattr("nag_kernels.integrations.api.install", refuse_the_second_expert)
    with pytest.raises(ValueError, match="refused for the test"):
        apply_nag(pipe)
    assert type(pipe) is WanPipeline
    for model in (pipe.transformer, pipe.transformer_2):
        assert not hasattr(model, "_nag_state") and not model._forward_pre_hooks and not model._forward_hooks
        assert all(type(p).__module__.startswith("diffusers") for p in model.attn_processors.values())


def test_a_refused_reapply_keeps_the_earlier_settings(monkeypatch):
    pipe = wan_toy.pipeline(two_experts=True)
    apply_nag(pipe, nag_scale=4.0)
    stock = install.install

    def refuse_the_second_expert(family, model):
        if model is pipe.transformer_2:
            raise ValueError("refused for the test")
        return stock(family, model)

    monkeypatch.setattr("nag_kernels.integrations.api.install", refuse_the_second_expert)
    with pytest.raises(ValueError, match="refused for the test"):
        apply_nag(pipe, nag_scale=8.0)
    assert pipe.transformer._nag_state.config.scale == 4.0 and pipe._nag_config.scale == 4.0
