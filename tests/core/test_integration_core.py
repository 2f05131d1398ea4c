"""The model-agnostic core: recommended settings per family and pipeline, the ``nag`` context manager, the registry
and the supported diffusers range. FLUX.1 is the family under test; the behaviour is the core's."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline

import flux_toy
from nag_kernels.integrations import apply_nag, nag, remove_nag, supported_models, supported_pipelines, versions
from nag_kernels.integrations.registry import family_for
from test_flux_transformer import inputs, positive, run

pytestmark = pytest.mark.usefixtures("single_thread")


def config(model):
    return model._nag_state.config


def test_apply_without_values_takes_the_family_recommendation_in_pipelines():
    assert config(apply_nag(flux_toy.transformer())).end == 1.0  # the model alone: the family's defaults
    kontext = apply_nag(flux_toy.pipeline(FluxKontextPipeline))
    assert (config(kontext.transformer).end, config(kontext.transformer).scale) == (0.25, 5.0)  # authors' Kontext
    assert config(apply_nag(flux_toy.pipeline(FluxKontextPipeline), nag_end=0.5).transformer).end == 0.5
    pipe = apply_nag(flux_toy.pipeline(FluxPipeline), nag_alpha=0.5)
    got = config(pipe.transformer)
    assert (got.scale, got.tau, got.alpha, got.end, got.mode) == (5.0, 2.5, 0.5, 1.0, "exact")


def test_context_manager_applies_and_undoes():
    model = flux_toy.transformer().double()
    kw = inputs()
    plain = run(model, positive(kw))
    with nag(model, nag_scale=7.0, backend="torch") as patched:
        assert patched is model and config(model).scale == 7.0
        guided = run(model, kw)
    assert not hasattr(model, "_nag_state") and not model._forward_pre_hooks
    assert torch.equal(run(model, positive(kw)), plain)
    assert (guided - plain).abs().max() > 1e-6

    apply_nag(model, nag_scale=4.0, backend="torch")  # already patched: the exit restores the earlier settings
    with nag(model, nag_scale=9.0):
        assert config(model).scale == 9.0
    assert config(model).scale == 4.0
    remove_nag(model)

    with pytest.raises(ValueError, match="nag_scale must be >= 1"):
        with nag(model, nag_scale=0.5):
            pass
    assert not hasattr(model, "_nag_state")  # nothing left behind by a refused setting


def test_context_manager_undoes_on_error():
    model = flux_toy.transformer()
    with pytest.raises(KeyError):
        with nag(model):
            raise KeyError("inside")
    assert not hasattr(model, "_nag_state")


def test_registry_names_families_models_and_pipelines():
    assert "FluxTransformer2DModel" in supported_models()
    assert {"FluxPipeline", "FluxKontextPipeline"} <= set(supported_pipelines())
    family = family_for(flux_toy.transformer())
    assert family.token_order == "text_first" and "single-stream" in family.describe()
    with pytest.raises(TypeError, match="supported models: .*FluxTransformer2DModel"):
        family_for(torch.nn.Linear(2, 2))


def test_mode_must_be_one_the_family_implements():
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_nag(flux_toy.transformer(), mode="approx")


def test_diffusers_range_refuses_below_the_floor_and_warns_above_the_newest_tested():
    with pytest.raises(ImportError, match="needs diffusers >= 0.35.0, found 0.34.0"):
        versions.check("0.34.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check("0.35.0")
        versions.check("0.42.1")
        versions.check("0.42.2.dev0")
    with pytest.warns(UserWarning, match="tested on diffusers 0.35.0 to 0.42.1, found 0.43.0"):
        versions.check("0.43.0")


def test_a_nag_config_gives_every_setting_to_models_and_pipelines_and_keywords_override_fields():
    from nag_kernels.integrations import NAGConfig

    given = NAGConfig(scale=7.0, tau=2.0, alpha=0.4, end=0.5, mode="fast", backend="torch")
    assert config(apply_nag(flux_toy.transformer(), given)) == given
    pipe = apply_nag(flux_toy.pipeline(FluxKontextPipeline), given, nag_tau=3.0)
    assert config(pipe.transformer) == NAGConfig(scale=7.0, tau=3.0, alpha=0.4, end=0.5, mode="fast", backend="torch")
    assert pipe._nag_config.end == 0.5  # the config's, not Kontext's recommended 0.25
    with pytest.raises(TypeError, match="config must be a NAGConfig, got dict"):
        apply_nag(flux_toy.transformer(), {"scale": 7.0})
