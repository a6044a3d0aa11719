import json
import random

import numpy as np
import pytest
import torch

from meshforge.checkpoints import latest_checkpoint, load_state, save_checkpoint
from meshforge.errors import InputError, MeshforgeError
from meshforge.models.registry import load_model
from meshforge.runtime import capture_rng, restore_rng
from tests.train.toy import ToyConfig, ToyModel

META = {"kind": "toy", "model_config": {"vocab": 13, "width": 16}}


def save(out, step, model, keep=3):
    return save_checkpoint(out, step=step, model=model, meta=META, state={"note": torch.tensor([step])}, keep=keep)


def test_round_trip_from_any_of_the_three_paths(tmp_path):
    model = ToyModel(ToyConfig())
    step_dir = save(tmp_path, 7, model)
    assert step_dir == tmp_path / "checkpoints" / "step_0000007"
    for path in (tmp_path, tmp_path / "checkpoints", step_dir):
        kind, loaded, meta = load_model(path, "cpu")
        assert kind == "toy" and meta["step"] == 7 and meta["path"] == str(step_dir)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
        assert loaded.head.weight is loaded.embed.weight  # tying survives (stored once)
    assert load_state(step_dir)["note"].item() == 7 and load_state(step_dir)["step"] == 7


def test_latest_pointer_and_pruning(tmp_path):
    model = ToyModel(ToyConfig())
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_0000040"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000030", "step_0000040"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary leftovers


def test_refuses_non_finite_weights_and_keeps_the_previous_one(tmp_path):
    model = ToyModel(ToyConfig())
    save(tmp_path, 10, model)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(MeshforgeError, match="non-finite values in fc1.weight"):
        save(tmp_path, 20, model)
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    assert not (tmp_path / "checkpoints" / "step_0000020").exists()


def test_bad_paths_and_kinds(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        load_model(tmp_path / "missing")
    with pytest.raises(InputError, match="not a checkpoint"):
        load_model(tmp_path)
    step_dir = save(tmp_path, 1, ToyModel(ToyConfig()))
    meta = json.loads((step_dir / "meta.json").read_text())
    (step_dir / "meta.json").write_text(json.dumps({**meta, "kind": "nope"}))
    with pytest.raises(MeshforgeError, match="unknown model kind 'nope'"):
        load_model(step_dir)
    (step_dir / "meta.json").write_text(json.dumps({**meta, "model_config": {"vocab": 13, "width": 8}}))
    with pytest.raises(InputError, match="weights do not fit the model"):
        load_model(step_dir)


def test_rng_capture_and_restore_reproduce_every_stream(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")  # and it survives a weights-only load
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
