"""The integration's host cost per transformer forward, on any device: what NAG's hooks, record and checks add.

Micro FLUX.1 and Wan transformers (one block of each kind, one head of width 8, a handful of tokens) make the compute
negligible, so what is timed is Python. Per model, in microseconds per call (the least of 5 runs of 200 calls, one thread, no grad):

- ``stock plain``: the unpatched model's forward;
- ``patched plain``: the patched model's forward without NAG rows (the stock computation plus NAG's hooks);
- ``patched guided``: a guided forward (2B text rows); it also computes more (a second branch), so it is an upper
  bound of the integration's cost, not a measure of it;
- ``hooks plain`` / ``hooks guided``: NAG's forward hooks alone (pre-hooks, and the post-hook where the family has
  one), called as torch calls them, on the plain and the guided inputs: the per-forward cost of the integration
  itself (argument reading, batch rules, the processor check, the per-call record).

``patched plain`` minus ``stock plain`` and the ``hooks`` rows are the figures that must not grow when the
integration changes.
"""

from __future__ import annotations

import time

import torch

RUNS, CALLS = 5, 200


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=1,
        joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    image, text = 4, 2
    plain = dict(
        hidden_states=torch.randn(1, image, 4), encoder_hidden_states=torch.randn(1, text, 8),
        pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]), img_ids=torch.zeros(image, 3),
        txt_ids=torch.zeros(text, 3), return_dict=False,
    )
    guided = {**plain, "encoder_hidden_states": torch.randn(2, text, 8), "pooled_projections": torch.randn(2, 8)}
    return model, plain, guided


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=32,
    ).eval()
    plain = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), encoder_hidden_states=torch.randn(1, 2, 8),
                 timestep=torch.tensor([500]), return_dict=False)
    guided = {**plain, "encoder_hidden_states": torch.randn(2, 2, 8)}
    return model, plain, guided


MODELS = {"FLUX.1": _flux, "Wan": _wan}
CASES = ("stock plain", "patched plain", "patched guided", "hooks plain", "hooks guided")


def host_us(fn, runs: int = RUNS, calls: int = CALLS) -> float:
    """The least, over ``runs``, of the mean microseconds per call of ``calls`` back-to-back calls (the least is the
    run that other processes disturbed least)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def _hooks(model, kwargs: dict):
    """NAG's forward hooks of ``model``, called in order as torch calls them (pre-hooks with kwargs, then the
    forward hooks with a stand-in output)."""
    pre = list(model._forward_pre_hooks.values())
    post = list(model._forward_hooks.values())

    def run():
        args, kw = (), dict(kwargs)
        for hook in pre:
            result = hook(model, args, kw)
            if result is not None:
                args, kw = result
        for hook in post:
            hook(model, args, kw, None)

    return run


def measure(name: str) -> list[dict]:
    from nag_kernels.integrations import apply_nag

    model, plain, guided = MODELS[name]()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            values = {"stock plain": host_us(lambda: model(**plain))}
            apply_nag(model, backend="torch")
            values["patched plain"] = host_us(lambda: model(**plain))
            values["patched guided"] = host_us(lambda: model(**guided))
            values["hooks plain"] = host_us(_hooks(model, plain))
            values["hooks guided"] = host_us(_hooks(model, guided))
    finally:
        torch.set_num_threads(threads)
    return [{"case": f"{name} {case}", "model": name, "call": case, "host_us": values[case]} for case in CASES]


def table(rows: list[dict]) -> str:
    from . import harness as h

    header = ["model", "call", "host us per call"]
    body = [[r["model"], r["call"], f"{r['host_us']:.1f}" if r.get("status", "ok") == "ok" else r["status"]]
            for r in rows]
    return h.markdown_table(header, body) + (
        "\nMicro transformers (compute negligible), one thread, no grad; the least of 5 runs of 200 calls. `hooks`: NAG's "
        "forward hooks alone (the integration's own per-forward cost); `patched plain` - `stock plain`: what a "
        "patched model costs on a call without NAG.\n")
