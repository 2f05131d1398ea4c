"""apply_nag on LTX-Video's modular blocks (LTXAutoBlocks, CFG guider), in float32: bit-identical to the classic
LTXPipeline from the same components with CFG off, within the stock pipelines' own difference with CFG on (the classic
pipeline batches CFG's passes); nag_end, prompts, videos per prompt; the text mask per branch. Stock modular LTX cannot
run with CFG off on diffusers 0.42.1 (its denoise step requires the negative embeddings); with NAG applied it can,
and remove_nag restores the stock blocks, failure included.

With several prompts and several videos per prompt, diffusers' LTX pipelines repeat a prompt's mask in another row
order than its embeddings (``mask.view(batch, -1).repeat(n, 1)``); the classic NAG encodes its negative with that
encode_prompt, so its NAG mask rows inherit that order, while the modular NAG rows follow the embeddings' order
(checked here on the rows themselves).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LTXPipeline
from diffusers.modular_pipelines import LTXAutoBlocks

import ltx_toy
import modular_toy
from modular_toy import generator
from nag_kernels.integrations import apply_nag, remove_nag
from nag_kernels.integrations.guided import state_of

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(height=ltx_toy.SIZE, width=ltx_toy.SIZE, num_frames=ltx_toy.FRAMES, num_inference_steps=2,
              max_sequence_length=ltx_toy.SEQ_LEN)


def pipelines():
    classic = ltx_toy.pipeline(LTXPipeline, dtype=torch.float32)
    return classic, modular_toy.modular(LTXAutoBlocks, classic)


def classic_latents(pipe, prompt, cfg, **kw):
    return pipe(prompt=prompt, guidance_scale=cfg, generator=generator(), output_type="latent", **COMMON, **kw).frames


def modular_latents(pipe, classic, prompt, cfg=None, **kw):
    """The modular pipeline's denoised latents, packed as the classic pipeline's latent output."""
    if cfg is not None:
        pipe.update_components(guider=modular_toy.cfg(cfg))
    with modular_toy.quiet():
        latents = pipe(prompt=prompt, generator=generator(), output="latents", **COMMON, **kw)
    return classic._pack_latents(latents, classic.transformer_spatial_patch_size,
                                 classic.transformer_temporal_patch_size)


CASES = {
    "one prompt": ("a red cat", dict(nag_negative_prompt="blurry, watermark")),
    "nag_end": ("a red cat", dict(nag_negative_prompt="blurry", nag_end=0.5)),
    "prompts": (["a red cat", "a dog"], dict(nag_negative_prompt=["blurry", "ugly"])),
    "videos per prompt": ("a red cat", dict(nag_negative_prompt="blurry", num_videos_per_prompt=2)),
}


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_modular_matches_classic(case, cfg):
    classic, modular = pipelines()
    prompt, kw = CASES[case]
    apply_nag(classic)
    apply_nag(modular)
    batch = {key: value for key, value in kw.items() if not key.startswith("nag_")}
    stock = modular_latents(modular, classic, prompt, cfg, **batch)
    stock_gap = (stock - classic_latents(classic, prompt, cfg, **batch)).abs().max()
    got = modular_latents(modular, classic, prompt, **kw)
    expected = classic_latents(classic, prompt, cfg, **kw)
    if cfg > 1:
        assert stock_gap < 1e-5
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    else:
        assert stock_gap == 0 and torch.equal(got, expected)
    assert (got - stock).abs().max() > 1e-3  # NAG acted


def test_nag_rows_follow_the_embeddings_order():
    classic, modular = pipelines()
    apply_nag(modular)
    inputs = []
    hook = modular.transformer.register_forward_pre_hook(lambda m, a, k: inputs.append(k), with_kwargs=True)
    modular_latents(modular, classic, ["a red cat", "a dog"], 1.0, num_videos_per_prompt=2,
                    nag_negative_prompt=["x", "a much longer negative"])
    hook.remove()
    mask = inputs[0]["encoder_attention_mask"]
    lengths = mask.sum(1)[4:].tolist()
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3] and lengths[0] < lengths[2]


def test_cfg_off_needs_nag_and_remove_nag_restores_the_stock_blocks():
    classic, modular = pipelines()
    with modular_toy.quiet(), pytest.raises(ValueError, match="negative_prompt_embeds"):  # stock, CFG off
        modular_latents(modular, classic, "a red cat", 1.0)
    stock = modular_latents(modular, classic, "a red cat", 3.0)
    apply_nag(modular)
    assert torch.equal(modular_latents(modular, classic, "a red cat"), stock)
    assert torch.equal(modular_latents(modular, classic, "a red cat", nag_negative_prompt="x", nag_scale=1.0), stock)
    same = modular_latents(modular, classic, "a red cat", nag_negative_prompt="a red cat")
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)  # float32
    assert torch.equal(modular_latents(modular, classic, "a red cat", 1.0), classic_latents(classic, "a red cat", 1.0))
    remove_nag(modular)
    assert state_of(modular.transformer) is None
    with modular_toy.quiet(), pytest.raises(ValueError, match="negative_prompt_embeds"):
        modular_latents(modular, classic, "a red cat")
    assert torch.equal(modular_latents(modular, classic, "a red cat", 3.0), stock)


def test_bad_input_gets_the_classic_errors():
    classic, modular = pipelines()
    apply_nag(classic)
    apply_nag(modular)
    modular.update_components(guider=modular_toy.cfg(1.0))
    embeds, mask, _, _ = classic.encode_prompt("x", do_classifier_free_guidance=False,
                                               max_sequence_length=ltx_toy.SEQ_LEN)

    def both(error, match=None, prompt="a red cat", **kw):
        modular_toy.same_error(error, lambda: classic_latents(classic, prompt, 1.0, **kw),
                               lambda: modular_latents(modular, classic, prompt, **kw), match)

    both(ValueError, "together", nag_negative_prompt_embeds=embeds)
    both(ValueError, "one per prompt", prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"])
    both(ValueError, "per-row shape", nag_negative_prompt_embeds=embeds[:, :3],
         nag_negative_prompt_attention_mask=mask[:, :3])
