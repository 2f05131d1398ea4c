"""What NAG needs to know about a family's modular diffusers blocks: the ``ModularSpec`` a family declares
(``Family.modular``). ``modular.py`` reads it; this module has no diffusers imports, so family modules can declare
it on any diffusers release."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ModularSpec:
    """What NAG needs to know about one family's modular blocks.

    Attributes:
        outputs: ``encode_prompt`` result index (the family ``PromptAdapter``'s ``embeds`` / ``per_branch`` indices)
            -> the name of the same tensor in the modular pipeline's state (``{0: "prompt_embeds", 1:
            "pooled_prompt_embeds"}``).
        guider_inputs: state name -> the key under which the family's denoise blocks hand that tensor to
            ``guider.prepare_inputs`` (``"encoder_hidden_states"``; SDXL: ``"prompt_embeds"``). Blocks that call
            ``prepare_inputs_from_block_state`` use the state names themselves.
        text_encoder: the top-level sub-block that encodes the prompt.
        pipelines: modular blocks class name -> the classic pipeline whose recommended settings apply
            (``{"FluxKontextAutoBlocks": "FluxKontextPipeline"}``).
        unconditional: run the text-encoder block with unconditional embeddings even when the guider needs none
            (Wan, LTX-Video: on diffusers 0.42.1 their denoise steps require the negative embeddings, so their stock
            modular pipelines cannot run with CFG off; ``WanTextEncoderStep`` even fails without them).
        join: optional ``join(positive, negative)`` for families whose per-branch conditioning is not one tensor
            per row set (Z-Image: a list of ``[L_i, D]`` tensors): ``positive`` and ``negative`` map state names to
            values with ``B`` rows each.
        model_names: the ``model_name`` of the family's modular blocks (a ``NAGTextEncoderStep`` built on one of
            its text-encoder blocks knows its family, and so its inputs, before the pipeline has components).
        step_rows: give the loop denoiser the step's ``t`` with one row per latent row in a NAG call (FLUX.1: the
            modular ``FluxLoopDenoiser`` passes ``timestep=t.flatten() / 1000``, one row, which the transformer
            broadcasts; the guided forward wants ``B`` or ``2B`` rows of it, as the classic pipeline passes).
        per_branch: the state names of the per-branch tensors when they are not those of the family adapter's
            ``per_branch`` indices in ``outputs`` (LTX-2: three connector outputs); the first gives the prompt count.
            Such a family gives ``join`` too, or names only ``outputs`` values.
        blocks: optional ``blocks(patched)``: the family's own changes to the copy of the blocks ``apply_nag`` makes,
            before the NAG step is inserted and the denoisers are wrapped (Wan Animate 2).
    """

    outputs: dict
    guider_inputs: dict
    model_names: tuple[str, ...] = ()
    step_rows: bool = False
    per_branch: tuple[str, ...] = ()
    blocks: Callable | None = None
    text_encoder: str = "text_encoder"
    pipelines: dict = dataclasses.field(default_factory=dict)
    unconditional: bool = False
    join: Callable | None = None


def join_lists(positive: dict, negative: dict) -> dict:
    """``ModularSpec.join`` for per-sample lists (Z-Image's captions): each list followed by the negative's."""
    return {name: [*positive[name], *negative[name]] for name in positive}
