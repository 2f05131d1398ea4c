"""apply_nag on SanaVideoTransformer3DModel, SanaVideoPipeline and SanaImageToVideoPipeline: the guided forward
against the independent float64 definition (``sana_reference.sana_video_forward``) with a text mask per branch,
batched CFG, I2V's per-token timesteps and nag_end, the off cases, removal, autograd, bad input and the parallel
refusal; the pipelines with and without CFG, num_videos_per_prompt and prompt batches; LoRA, group offloading in either
order, model CPU offload through a pipeline call and regional compilation with changing settings."""

from __future__ import annotations

import diffusers
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sana_reference
import sana_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_sana_pipeline import negative
from test_sana_transformer import _finite_difference, plain_rows, run

if not hasattr(diffusers, "SanaVideoPipeline"):
    pytest.skip("this diffusers has no Sana-Video (diffusers >= 0.36)", allow_module_level=True)
from diffusers import SanaImageToVideoPipeline, SanaVideoPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 2, sana_toy.SEQ_LEN
ATOL = 1e-7  # the float32 linear attention (~1e-9 per block)
RECOMMENDED = {"scale": 9.0, "tau": 3.5, "alpha": 0.25}


def inputs(rows=B, text_rows=2 * B, seed=0, timestep=700.0, per_token=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(text_rows, T)
    mask[torch.arange(text_rows), T - 1 - torch.arange(text_rows) % 3] = 0
    channels, frames, height, width = sana_toy.VIDEO_LATENT
    t = torch.full((rows,), timestep, dtype=torch.float64)
    if per_token:  # I2V: [rows, 1, F, H', W'] with the conditioning frame at 0
        t = t.view(rows, 1, 1, 1, 1).expand(rows, 1, frames, height // 2, width // 2).clone()
        t[:, :, 0] = 0
    return dict(
        hidden_states=torch.randn(rows, channels, frames, height, width, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(text_rows, T, sana_toy.TEXT_DIM, generator=g, dtype=torch.float64),
        timestep=t, encoder_attention_mask=mask,
    )


def reference(model, kw, **settings):
    with torch.no_grad():
        return sana_reference.sana_video_forward(model, **kw, **settings)


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("cfg, per_token", [(False, False), (True, False), (True, True)],
                         ids=["nag-only", "batched-cfg", "i2v-per-token"])
def test_guided_forward_equals_the_definition(cfg, per_token):
    model = sana_toy.video_transformer().double()
    kw = inputs(2 * B, 3 * B, per_token=per_token) if cfg else inputs(per_token=per_token)
    rows = kw["hidden_states"].shape[0]
    plain = run(model, plain_rows(kw, rows))
    close(plain, reference(model, plain_rows(kw, rows)))
    apply_nag(model, backend="torch")
    out = run(model, kw)
    close(out, reference(model, kw))
    assert (out - plain)[rows - B:].abs().max() > 1e-3
    if cfg:
        assert torch.equal(out[:B], plain[:B])
    out = run(model, kw, nag_scale=5.0, nag_tau=2.0, nag_alpha=0.5)
    close(out, reference(model, kw, scale=5.0, tau=2.0, alpha=0.5))
    assert torch.equal(run(model, plain_rows(kw, rows)), plain)


def test_off_cases_nag_end_on_the_noisiest_token_and_remove():
    model = sana_toy.video_transformer().double()
    kw = inputs(per_token=True)  # 700 everywhere but the conditioning frame (0)
    plain = run(model, plain_rows(kw, B))
    processors = model.attn_processors
    apply_nag(model, backend="torch")
    assert torch.equal(run(model, kw, nag_scale=1.0), plain)
    assert torch.equal(run(model, kw, nag_end=0.25), plain)  # 700 < 750: off
    assert (run(model, kw, nag_end=0.3) - plain).abs().max() > 1e-3  # the noisiest token (700) decides, not frame 0
    same = {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:B]] * 2),
            "encoder_attention_mask": torch.cat([kw["encoder_attention_mask"][:B]] * 2)}
    close(run(model, same), plain, atol=1e-12)
    remove_nag(model)
    assert model.attn_processors == processors and not model._forward_pre_hooks and not model._forward_hooks
    assert not any(any(k.startswith("_nag") or k == "forward" for k in m.__dict__) for m in model.modules())
    assert torch.equal(run(model, plain_rows(kw, B)), plain)


def test_autograd_matches_finite_differences():
    model = apply_nag(sana_toy.video_transformer(layers=1).double(), backend="torch")
    kw = inputs(1, 2)
    weight = model.transformer_blocks[0].attn2.to_v.weight
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(kw["hidden_states"].shape, generator=g, dtype=torch.float64)

    def loss(x, w=None):
        original = weight.data.clone()
        if w is not None:
            weight.data.copy_(w)
        try:
            return (model(**{**kw, "hidden_states": x}, return_dict=False)[0] * probe).sum()
        finally:
            weight.data.copy_(original)

    x = kw["hidden_states"].clone().requires_grad_(True)
    loss(x).backward()
    dx, dw = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, weight))
    torch.testing.assert_close((x.grad * dx).sum(), _finite_difference(loss, x.detach(), dx), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close((weight.grad * dw).sum(),
                               _finite_difference(lambda w: loss(kw["hidden_states"], w), weight.detach().clone(), dw),
                               rtol=1e-3, atol=1e-6)


def test_bad_input_and_the_parallel_refusal():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model = apply_nag(sana_toy.video_transformer().double(), backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states must be \\[2B, T, caption_channels=32\\]"):
        run(model, {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :16]})
    with pytest.raises(ValueError, match="timestep must have the batch of hidden_states \\(2\\) in a NAG call, got 4"):
        run(model, {**kw, "timestep": torch.cat([kw["timestep"]] * 2)})
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    model.transformer_blocks[1].attn2.processor._parallel_config = config  # what enable_parallelism sets
    with pytest.raises(NotImplementedError, match="NAG cannot guide this call under diffusers' parallelism"):
        run(model, kw)
    model.transformer_blocks[1].attn2.processor._parallel_config = None
    close(run(model, kw), reference(model, kw))


COMMON = dict(height=sana_toy.VIDEO_SIZE, width=sana_toy.VIDEO_SIZE, frames=sana_toy.FRAMES, num_inference_steps=2,
              max_sequence_length=sana_toy.SEQ_LEN, output_type="latent", use_resolution_binning=False)


def gen():
    return torch.Generator().manual_seed(0)


def reference_forward(model, neg, settings, calls):
    embeds, mask = neg
    end = settings.get("end", 1.0)
    nag = {k: settings[k] for k in ("scale", "tau", "alpha")}

    def forward(hidden_states, encoder_hidden_states, timestep, guidance=None, encoder_attention_mask=None,
                attention_mask=None, attention_kwargs=None, controlnet_block_samples=None, return_dict=True):
        on = float(timestep.max()) >= (1 - end) * 1000
        calls.append(on)
        text, text_mask = encoder_hidden_states, encoder_attention_mask
        if on:
            text = torch.cat([text, embeds.to(text.dtype)])
            text_mask = torch.cat([text_mask, mask.to(text_mask.dtype)])
        with torch.no_grad():
            return (sana_reference.sana_video_forward(model, hidden_states, text, timestep, text_mask, **nag),)

    return forward


def expected_frames(pipe, neg, settings, call):
    calls = []
    pipe.transformer.forward = reference_forward(pipe.transformer, neg, settings, calls)
    try:
        return call(), calls
    finally:
        del pipe.transformer.forward


@pytest.mark.parametrize("cls, guidance, per_video", [
    (SanaVideoPipeline, 1.0, 1), (SanaVideoPipeline, 3.0, 2), (SanaImageToVideoPipeline, 1.0, 1),
    (SanaImageToVideoPipeline, 3.0, 1)],
    ids=["t2v-nag-only", "t2v-cfg-2-per-prompt", "i2v-nag-only", "i2v-cfg"])
def test_video_pipelines_match_the_definition(cls, guidance, per_video):
    pipe = sana_toy.pipeline(cls)
    prompts, negatives = ["a red cat", "a blue bird"], ["dog", "tree"]
    kw = {**COMMON, "guidance_scale": guidance, "num_videos_per_prompt": per_video, "negative_prompt": "ugly"}
    if cls is SanaImageToVideoPipeline:  # diffusers' I2V supports num_videos_per_prompt=1 only (its timestep mask)
        kw["image"] = sana_toy.image(sana_toy.VIDEO_SIZE)
    plain = pipe(prompt=prompts, generator=gen(), **kw).frames
    neg = negative(pipe, prompts, negatives, per_image=per_video)
    settings = {**RECOMMENDED, "end": 0.1}
    expected, calls = expected_frames(pipe, neg, settings, lambda: pipe(prompt=prompts, generator=gen(), **kw).frames)
    assert calls == [True, False]
    apply_nag(pipe, backend="torch", nag_end=0.1)
    assert torch.equal(pipe(prompt=prompts, generator=gen(), **kw).frames, plain)
    out = pipe(prompt=prompts, nag_negative_prompt=negatives, generator=gen(), **kw).frames
    close(out, expected, atol=1e-6)  # the pipeline steps in float32
    assert out.shape[0] == 2 * per_video and (out - plain).abs().max() > 1e-3
    remove_nag(pipe)
    assert torch.equal(pipe(prompt=prompts, generator=gen(), **kw).frames, plain)


def test_model_cpu_offload_through_a_pipeline_call():
    pipe = sana_toy.pipeline(SanaVideoPipeline)
    kw = {**COMMON, "guidance_scale": 3.0, "complex_human_instruction": None}
    expected, _ = expected_frames(pipe, negative(pipe, "a red cat", "dog"), RECOMMENDED,
                                  lambda: pipe("a red cat", generator=gen(), **kw).frames)
    apply_nag(pipe, backend="torch")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        close(pipe("a red cat", nag_negative_prompt="dog", generator=gen(), **kw).frames, expected, atol=1e-6)


@pytest.mark.parametrize("order", ["offload-then-nag", "nag-then-offload"])
def test_group_offloading_in_either_order(order):
    model = sana_toy.video_transformer().double()
    kw = inputs()
    expected, plain = reference(model, kw), run(model, plain_rows(kw, B))
    cpu = torch.device("cpu")

    def offload():
        model.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)

    (offload if order == "offload-then-nag" else (lambda: apply_nag(model, backend="torch")))()
    (offload if order == "nag-then-offload" else (lambda: apply_nag(model, backend="torch")))()
    close(run(model, kw), expected)
    remove_nag(model)
    close(run(model, plain_rows(kw, B)), plain, atol=0)


def test_lora_and_regional_compilation_with_changing_settings():
    from peft import LoraConfig

    torch._dynamo.reset()
    model = sana_toy.video_transformer(layers=10).double()  # more blocks than dynamo's recompile limit (8)
    model.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_k", "attn2.to_q", "attn1.to_v"],
                                 init_lora_weights=False))
    model._repeated_blocks = ["SanaVideoTransformerBlock"]  # diffusers 0.42.1 declares none
    kw = inputs()
    apply_nag(model, backend="torch")
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter, fullgraph=True)
    graphs = []
    for scale, tau, alpha in [(9.0, 3.5, 0.25), (5.0, 2.5, 0.25), (11.0, 1.5, 0.5)]:
        out = run(model, kw, nag_scale=scale, nag_tau=tau, nag_alpha=alpha)
        close(out, reference(model, kw, scale=scale, tau=tau, alpha=alpha))  # LoRA layers in both
        graphs.append(counter.frame_count)
    assert graphs == [graphs[0]] * 3 and graphs[0] <= 2, f"graphs after each call: {graphs}"
