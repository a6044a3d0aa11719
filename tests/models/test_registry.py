"""The model registry: specs registered beside their models, typed loading, samplers and evaluators by spec."""

import pytest
import torch

from meshforge.checkpoints import save_checkpoint
from meshforge.errors import InputError, MeshforgeError
from meshforge.models.iflame import IFlame
from meshforge.models.registry import (
    LoadedModel,
    checkpoint_kind,
    load_model,
    model_spec,
    spec_for_metric,
    specs,
)
from meshforge.models.ss_dit import LatentFlow
from meshforge.models.ss_vae import SSVAE
from tests.train.toy import ToyConfig, ToyModel


def toy_checkpoint(tmp_path):
    meta = {"kind": "toy", "model_config": {"vocab": 13, "width": 16}}
    return save_checkpoint(tmp_path, step=3, model=ToyModel(ToyConfig()), meta=meta, state={}, keep=1)


def test_each_model_module_registers_its_spec():
    kinds = {spec.kind: spec for spec in specs()}
    assert {"iflame", "ss-vae", "ss-dit"} <= kinds.keys()
    assert (kinds["iflame"].model_cls, kinds["ss-vae"].model_cls, kinds["ss-dit"].model_cls) == (IFlame, SSVAE, LatentFlow)


def test_specs_name_their_sampler_and_evaluator():
    from meshforge.metrics import recon, tokens
    from meshforge.sample import run

    assert model_spec("iflame").sample_function() is run.sample_iflame
    assert model_spec("ss-dit").sample_function() is run.sample_dit
    assert model_spec("iflame").evaluate_function() is tokens.evaluate_checkpoint
    assert model_spec("ss-vae").evaluate_function() is recon.evaluate_checkpoint
    with pytest.raises(MeshforgeError, match="'ss-vae' checkpoint does not sample meshes .*iflame, ss-dit"):
        model_spec("ss-vae").sample_function()
    with pytest.raises(MeshforgeError, match="'ss-dit' checkpoint has no evaluator"):
        model_spec("ss-dit").evaluate_function()
    assert spec_for_metric("face-acc").kind == spec_for_metric("perplexity").kind == "iflame"
    assert spec_for_metric("recon").kind == "ss-vae" and spec_for_metric("cov-mmd-1nna") is None


def test_load_model_is_typed_by_expect(tmp_path):
    step_dir = toy_checkpoint(tmp_path)
    assert checkpoint_kind(tmp_path) == "toy"
    loaded = load_model(tmp_path, "cpu", expect=ToyModel)
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, ToyModel) and not loaded.model.training
    kind, model, meta = loaded  # still unpacks as before
    assert kind == "toy" and model is loaded.model and meta["path"] == str(step_dir) and meta["weights"] == "model"
    assert loaded.spec is model_spec("toy")
    with pytest.raises(InputError, match=r"is a 'toy' checkpoint; expected 'ss-vae'") as caught:
        load_model(tmp_path, torch.device("cpu"), expect=SSVAE)
    assert "\n" not in str(caught.value)
