"""The modular integration's structure, on diffusers' own block classes (no components, no model calls): every block
set this project supports gets the NAG text-encoder step after its text encoder and its loop denoisers wrapped, the
NAG inputs of its family, the original blocks untouched; unsupported pipelines are refused clearly.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import modular_pipelines as mp

import modular_toy
from nag_kernels.integrations import apply_nag, modular, remove_nag
from nag_kernels.integrations.registry import families

SETTINGS = {"nag_scale", "nag_tau", "nag_alpha", "nag_end"}

# block set -> (family name, the NAG inputs it declares besides the settings)
BLOCK_SETS = {
    "FluxAutoBlocks": ("FLUX.1", {"nag_negative_prompt", "nag_negative_prompt_2", "nag_negative_prompt_embeds",
                                  "nag_negative_pooled_prompt_embeds"}),
    "FluxKontextAutoBlocks": ("FLUX.1", {"nag_negative_prompt", "nag_negative_prompt_2", "nag_negative_prompt_embeds",
                                         "nag_negative_pooled_prompt_embeds"}),
    "Flux2AutoBlocks": ("FLUX.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Flux2KleinAutoBlocks": ("FLUX.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Flux2KleinBaseAutoBlocks": ("FLUX.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "QwenImageAutoBlocks": ("Qwen-Image", {"nag_negative_prompt", "nag_negative_prompt_embeds",
                                           "nag_negative_prompt_embeds_mask"}),
    "QwenImageEditAutoBlocks": ("Qwen-Image", {"nag_negative_prompt", "nag_negative_prompt_embeds",
                                               "nag_negative_prompt_embeds_mask"}),
    "QwenImageEditPlusAutoBlocks": ("Qwen-Image", {"nag_negative_prompt", "nag_negative_prompt_embeds",
                                                   "nag_negative_prompt_embeds_mask"}),
    "QwenImageLayeredAutoBlocks": ("Qwen-Image", {"nag_negative_prompt", "nag_negative_prompt_embeds",
                                                  "nag_negative_prompt_embeds_mask"}),
    "WanBlocks": ("Wan 2.1 / 2.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Wan22Blocks": ("Wan 2.1 / 2.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "WanImage2VideoAutoBlocks": ("Wan 2.1 / 2.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Wan22Image2VideoBlocks": ("Wan 2.1 / 2.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Wan22VaceBlocks": ("Wan 2.1 / 2.2", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "StableDiffusionXLAutoBlocks": ("SDXL", {"nag_negative_prompt", "nag_negative_prompt_2",
                                             "nag_negative_prompt_embeds"}),
    "StableDiffusion3AutoBlocks": ("SD3", {"nag_negative_prompt", "nag_negative_prompt_2", "nag_negative_prompt_3",
                                           "nag_negative_prompt_embeds", "nag_negative_pooled_prompt_embeds"}),
    "ZImageAutoBlocks": ("Z-Image", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "LTXAutoBlocks": ("LTX-Video", {"nag_negative_prompt", "nag_negative_prompt_embeds",
                                    "nag_negative_prompt_attention_mask"}),
    "Flux3AutoBlocks": ("FLUX.3", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
    "Flux3DistilledAutoBlocks": ("FLUX.3", {"nag_negative_prompt", "nag_negative_prompt_embeds"}),
}


def _family(name):
    return next(family for family in families() if family.name == name)


def _names(blocks):
    return [param.name for param in blocks.inputs]


def _wrapped(blocks):
    found = []
    for block in (blocks.sub_blocks or {}).values():
        if isinstance(block, mp.modular_pipeline.LoopSequentialPipelineBlocks):
            found += [sub for sub in block.sub_blocks.values() if isinstance(sub, modular.NAGLoopDenoiser)]
        else:
            found += _wrapped(block)
    return found


@pytest.mark.parametrize("name", list(BLOCK_SETS))
def test_every_block_set_gets_the_nag_step_and_its_denoisers_wrapped(name):
    family_name, nag_inputs = BLOCK_SETS[name]
    family = _family(family_name)
    blocks = getattr(mp, name)()
    before = _names(blocks)
    patched = modular.patch_blocks(blocks, family, modular.spec_for(family))
    assert _names(blocks) == before and not _wrapped(blocks)  # the original is untouched
    steps = list(patched.sub_blocks)
    assert steps[steps.index("text_encoder") + 1] == modular.STEP_NAME
    assert modular.family_named(blocks.sub_blocks["text_encoder"].model_name) is family
    inputs = set(_names(patched))
    assert {name for name in inputs if name and name.startswith("nag_")} == nag_inputs | SETTINGS
    assert set(before) <= inputs and modular.RECORD not in inputs  # the record is the NAG step's output
    wrapped = _wrapped(patched)
    assert wrapped and all(set(family.guided_models) & {c.name for c in w.expected_components} for w in wrapped)
    assert repr(patched) and patched.doc  # diffusers' own rendering of the blocks still works


def test_refusals(monkeypatch):
    import flux_toy
    from diffusers import FluxPipeline

    from nag_kernels.integrations.registry import family_for

    classic = flux_toy.pipeline(FluxPipeline)
    pipe = modular_toy.modular(mp.FluxAutoBlocks, classic)
    monkeypatch.setattr(family_for(classic.transformer), "modular", None)  # a family that declares no modular blocks
    with pytest.raises(TypeError, match="modular blocks yet"):
        apply_nag(pipe)
    monkeypatch.undo()
    blocks = mp.FluxAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    bare = modular_toy.modular(None, classic, blocks=blocks)
    with pytest.raises(TypeError, match="no 'text_encoder' step"):
        apply_nag(bare)
    assert "_nag_original_blocks" not in bare.__dict__
    from nag_kernels.integrations.guided import state_of

    assert state_of(bare.transformer) is None  # refused before anything was patched
    remove_nag(pipe)  # a no-op on a pipeline never patched
    assert isinstance(pipe.transformer, torch.nn.Module)
