"""NAG on LTX-2's modular blocks (``LTX2AutoBlocks`` with the ``LTX2Guidance`` video and audio guiders): the entry
``integrations/modular.py`` needs for LTX-2 (``LTX2_SPEC``), patched into ``modular.SPECS`` here until the core has
it (when it does, the core's entry is used as it is).

LTX-2's modular conditioning is three tensors per text row, the connectors' outputs (``connector_prompt_embeds``,
``connector_audio_prompt_embeds``, ``connector_attention_mask``), not the classic adapter's two ``encode_prompt``
tensors (Gemma embeddings and mask): ``ModularSpec.per_branch`` names them and ``join`` appends the NAG negative's
rows to each. The modular path takes ``nag_negative_prompt`` (text) only.

Expected outputs: the stock modular pipeline on the same components whose transformer is ``ltx2_reference``'s model
in the 2B layout, with the NAG negative's connector outputs appended to every call whose text ends with the
positive's (as in ``test_ltx2_pipeline``): the conditional, STG and modality-isolation passes guided, the
unconditional pass plain. float64.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LTX2Pipeline
from diffusers.guiders import LTX2Guidance
from diffusers.modular_pipelines import LTX2AutoBlocks

import ltx2_toy
import modular_toy
from nag_kernels.integrations import apply_nag, remove_nag
from test_ltx2_pipeline import connector_outputs, reference

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ("connector_prompt_embeds", "connector_audio_prompt_embeds", "connector_attention_mask")
KW = dict(height=ltx2_toy.SIZE, width=ltx2_toy.SIZE, num_frames=ltx2_toy.FRAMES, frame_rate=ltx2_toy.FPS,
          num_inference_steps=2, max_sequence_length=ltx2_toy.SEQ_LEN)




def guiders(cfg: bool):
    with modular_toy.quiet():
        if not cfg:  # distilled: no CFG, STG or modality guidance
            return LTX2Guidance(), LTX2Guidance()
        return (LTX2Guidance(guidance_scale=3.0, stg_scale=1.0, modality_scale=2.0, guidance_rescale=0.5,
                             spatio_temporal_guidance_blocks=[1]),
                LTX2Guidance(guidance_scale=2.0, stg_scale=0.5, modality_scale=1.5, guidance_rescale=0.5))


def modular_pipe(classic, cfg):
    pipe = modular_toy.modular(LTX2AutoBlocks, classic)
    video, audio = guiders(cfg)
    with modular_toy.quiet():
        pipe.update_components(guider=video, audio_guider=audio)
    return pipe


def run(pipe, **extra):
    with torch.no_grad(), modular_toy.quiet():
        out = pipe(prompt="a red cat", negative_prompt="ugly", generator=modular_toy.generator(),
                   output=["latents", "audio_latents"], **KW, **extra)
    return out["latents"], out["audio_latents"]


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg-stg-modality", "distilled"])
def test_ltx2_auto_blocks_match_the_reference(cfg):
    classic = ltx2_toy.pipeline(LTX2Pipeline, "2.3")
    pipe = modular_pipe(classic, cfg)
    plain = run(pipe)
    positive, negative = connector_outputs(classic, ["a red cat"]), connector_outputs(classic, ["dog"])
    expected = run(modular_pipe(reference(classic, positive, negative), cfg))
    apply_nag(pipe, backend="torch")
    out = run(pipe, nag_negative_prompt="dog")
    for o, e, p in zip(out, expected, plain):
        torch.testing.assert_close(o, e, rtol=0, atol=1e-10)
        assert (o - p).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(run(pipe), plain))  # no NAG arguments: the stock blocks
    remove_nag(pipe)
    assert all(torch.equal(a, b) for a, b in zip(run(pipe), plain))
