"""``NAGGuidance``: Normalized Attention Guidance as a diffusers guider, for modular pipelines composed by hand.

A modular pipeline's denoise step hands its guider the conditioning of each guidance batch (``prepare_inputs``:
``{name: (conditional, unconditional)}``), calls ``prepare_models`` / the denoiser / ``cleanup_models`` once per
batch and combines the predictions with the guider's ``__call__``. ``NAGGuidance`` is diffusers'
``ClassifierFreeGuidance`` (same config, ``enabled``, ``start`` / ``stop`` and ``guidance_scale``: above 1 two passes,
at 1 one pass) whose **conditional** batch carries the NAG negative's rows after the positive rows (``2B`` text rows
for ``B`` latents: the guided forward of the transformer contract, ``guided.py``); the unconditional batch stays
plain. ``nag_scale``, ``nag_tau``, ``nag_alpha``, ``nag_end`` are config fields, saved and loaded with the guider.

The NAG negative comes from ``modular.NAGTextEncoderStep`` (the pipeline's blocks must include it after their
text-encoder step, which also makes the pipeline accept ``nag_negative_prompt``): the step leaves the call's
``NAGCall`` on its thread and the guider takes it at the first step of the denoise loop. The guider keeps nothing of
a call on itself beyond diffusers' own per-step state: the record and the settings of a forward are per thread
(``call_state``). The denoiser is patched for NAG on the first guided pass if it is not yet (``remove_nag(pipe)``
or ``remove_nag(transformer)`` unpatches it).
"""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance

from . import call_state, modular
from .config import NAGConfig
from .guided import state_of

_SCOPE = "modular_nag_scope"  # call_state slot: the pipeline_call context of the pass in progress


class NAGGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance with Normalized Attention Guidance on its conditional pass.

    Args:
        guidance_scale: CFG scale (``> 1``: an unconditional pass too; ``1``: the conditional pass only).
        nag_scale, nag_tau, nag_alpha, nag_end: NAG's settings (docs/spec.md, "The combine"; ``nag_end`` is a
            noise-level threshold). ``None``: the model family's recommended value. A pipeline call's ``nag_scale``
            ... override them for that call.
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``;
            ``enabled=False`` turns off CFG and NAG alike, ``start`` / ``stop`` are CFG's step window.

    NAG acts on every call of a pipeline whose blocks include ``modular.NAGTextEncoderStep`` (the NAG negative
    defaults to the empty string) while ``nag_scale > 1``.

    Example::

        >>> from diffusers.modular_pipelines import QwenImageAutoBlocks
        >>> from nag_kernels.integrations import NAGGuidance
        >>> from nag_kernels.integrations.modular import NAGTextEncoderStep
        >>> blocks = QwenImageAutoBlocks()
        >>> blocks.sub_blocks.insert("nag_text_encoder", NAGTextEncoderStep(blocks.sub_blocks["text_encoder"]), 1)
        >>> pipe = blocks.init_pipeline("Qwen/Qwen-Image")
        >>> pipe.load_components(torch_dtype=torch.bfloat16)
        >>> pipe.update_components(guider=NAGGuidance(guidance_scale=4.0, nag_scale=5.0))
        >>> image = pipe(prompt="a cat", nag_negative_prompt="blurry", output="images")[0]
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        nag_scale: float | None = None,
        nag_tau: float | None = None,
        nag_alpha: float | None = None,
        nag_end: float | None = None,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        NAGConfig().replace(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, end=nag_end)  # the clear errors, now
        super().__init__(guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled)
        self.nag_scale = nag_scale
        self.nag_tau = nag_tau
        self.nag_alpha = nag_alpha
        self.nag_end = nag_end

    def nag_config(self, family) -> NAGConfig:
        """The guider's NAG settings for ``family``: its config fields over the family's recommended values."""
        base = NAGConfig(**family.recommended(None))
        return base.replace(scale=self.nag_scale, tau=self.nag_tau, alpha=self.nag_alpha, end=self.nag_end)

    # -- per step -----------------------------------------------------------------------------------------------

    def set_state(self, step, num_inference_steps, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a denoise loop starts: it takes the record its NAG text-encoder step left on this thread
            call = modular.take_pending()
            if call is None and self._enabled and not modular.joined_here():
                modular.warn_no_record(self)
            modular.set_active(call if isinstance(call, modular.NAGCall) else None)

    def _call(self):
        """The NAGCall this guider adds to its conditional pass now, or None."""
        call = modular.active_call()
        if call is None or not self._enabled or modular.joined_here() or call.config.scale <= 1:
            return None
        return call

    def prepare_inputs(self, data: dict) -> list:
        batches = super().prepare_inputs(data)
        call = self._call()
        if call is not None:
            keys = {call.spec.guider_inputs[name]: name for name in call.per_branch if name in call.spec.guider_inputs}
            positive = {}
            for key, name in keys.items():
                value = data.get(key)
                positive[name] = value[0] if isinstance(value, tuple) else value
            self._join(batches, call, keys, positive)
        return batches

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        batches = super().prepare_inputs_from_block_state(data, input_fields)
        call = self._call()
        if call is not None:
            keys = {}
            for key, field in input_fields.items():
                name = field if isinstance(field, str) else field[0]
                if name in call.per_branch:
                    keys[key] = name
            positive = {name: getattr(data, name, None) for name in keys.values()}
            self._join(batches, call, keys, positive)
        return batches

    def _join(self, batches: list, call, keys: dict, positive: dict) -> None:
        first = call.per_branch[0]
        if positive.get(first) is None:
            raise ValueError(
                f"NAGGuidance found no {first} among the denoise step's guider inputs ({', '.join(keys) or 'none'})"
            )
        joined = call.join(positive)
        for batch in batches:
            if getattr(batch, self._identifier_key, None) == "pred_cond":
                for key, name in keys.items():
                    setattr(batch, key, joined[name])

    def prepare_models(self, denoiser) -> None:
        super().prepare_models(denoiser)
        call = self._call()
        if call is None:
            return
        model = getattr(denoiser, "_orig_mod", denoiser)
        if state_of(model) is None:
            from .api import _apply_model

            _apply_model(model, call.config, type(model).__name__, owner=self)
        scope = call_state.pipeline_call(call.config)
        scope.__enter__()
        call_state.put(_SCOPE, scope)

    def cleanup_models(self, denoiser) -> None:
        scope = call_state.take(_SCOPE)
        if scope is not None:
            scope.__exit__(None, None, None)
        super().cleanup_models(denoiser)
