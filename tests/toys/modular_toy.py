"""Modular pipelines on the tiny offline components of the classic pipeline tests (``*_toy.py``), for the modular
NAG tests: ``modular(blocks_cls, classic)`` builds a modular pipeline from the same component objects as a classic
pipeline (no decode step: the tests compare the denoised latents), ``cfg`` a CFG guider without its experimental
warning, and ``same_error`` checks that a classic and a modular call fail with the same error.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance


def modular(blocks_cls, classic, drop=("decode",), components_manager=None, blocks=None):
    """A modular pipeline of ``blocks_cls`` (without the ``drop`` steps) on ``classic``'s component objects."""
    blocks = blocks if blocks is not None else blocks_cls()
    for name in drop:
        blocks.sub_blocks.pop(name, None)
    pipe = blocks.init_pipeline(components_manager=components_manager)
    given = {name: value for name, value in classic.components.items() if name in pipe._component_specs}
    given = {name: value for name, value in given.items() if value is not None}
    with quiet():
        pipe.update_components(**given)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cfg(scale: float, **config) -> ClassifierFreeGuidance:
    with quiet():
        return ClassifierFreeGuidance(guidance_scale=scale, **config)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class quiet:
    """Silence diffusers' logger (the guiders' "experimental" warning, modular "Error in block" tracebacks) and
    warnings inside the block."""

    def __enter__(self):
        self._logger = logging.getLogger("diffusers")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._logger.setLevel(self._level)
        return False


def same_error(error: type, classic_call, modular_call, match: str | None = None) -> str:
    """Both calls raise ``error`` with the same message (containing ``match``); returns it."""
    with pytest.raises(error, match=match) as classic_err:
        classic_call()
    with quiet(), pytest.raises(error, match=match) as modular_err:
        modular_call()
    assert str(modular_err.value) == str(classic_err.value)
    return str(classic_err.value)
