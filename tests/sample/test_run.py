"""`meshforge sample`: dispatch by checkpoint kind, decoding, outputs; samplers and models are fakes
(plus one end-to-end test that runs once the real iFlame model and sampler are importable)."""

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch
from meshforge_plugins.cli import main
from torch import nn

from meshforge.config import from_dict
from meshforge.data.canonical import canonicalize
from meshforge.data.meshio import load_mesh_file
from meshforge.data.synth import synth_mesh
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import ConfigError, MeshforgeError
from meshforge.sample.run import SampleStageConfig, sample_to_dir
from meshforge.train import checkpoint

VOCAB = Vocab(7)
SOURCES = [canonicalize(*synth_mesh(f, 0, i), bits=7) for i, f in enumerate(["table", "chair", "lamp"])]
TETRAHEDRON = (np.eye(4, 3, k=-1), np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]))


def cli(text, *paths):
    """``main`` on a command line whose ``{}`` are filled with ``paths`` (kept whole if they hold spaces)."""
    words = text.split()
    fill = iter(paths)
    return main([str(next(fill)) if w == "{}" else w for w in words])


def fake_checkpoint(monkeypatch, kind):
    def load_model(path, device):
        meta = {"kind": kind, "path": str(path), "step": 7, "model_config": {"vocab_size": VOCAB.size}}
        return kind, nn.Linear(1, 1).to(device), meta

    monkeypatch.setattr(checkpoint, "load_model", load_model)


def fake_module(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


@dataclasses.dataclass
class FakeSampleConfig:
    n: int
    batch_size: int
    max_faces: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    cuda_graphs: bool


@pytest.fixture
def iflame(monkeypatch):
    """A fake iFlame sampler (the contract of meshforge.sample.iflame): mesh i is SOURCES[i % 3]."""
    calls = {}

    def sample_tokens(model, vocab, cfg, device):
        calls.update(dataclasses.asdict(cfg), vocab=vocab, device=device)
        sequences = [encode_mesh(SOURCES[i % 3]) for i in range(cfg.n)]
        produced = sum(len(s) + 1 for s in sequences)
        return sequences, {"time_s": 0.5, "tokens": produced, "tokens_per_s": produced / 0.5, "steps": 9}

    fake_checkpoint(monkeypatch, "iflame")
    fake_module(monkeypatch, "meshforge.sample.iflame",
                SampleConfig=FakeSampleConfig, sample_tokens=sample_tokens)
    return calls


def test_iflame_samples_are_decoded_and_written(iflame, tmp_path):
    out = tmp_path / "samples"
    options = "--n 4 --batch-size 2 --formats obj,ply --top-p 0.9 --max-faces 300 --no-cuda-graphs"
    assert cli(f"--device cpu --seed 3 sample --checkpoint {{}} --out {{}} {options}", tmp_path, out) == 0
    assert iflame == {"n": 4, "batch_size": 2, "max_faces": 300, "temperature": 1.0, "top_k": None,
                      "top_p": 0.9, "seed": 3, "cuda_graphs": False, "vocab": VOCAB, "device": torch.device("cpu")}
    stats = json.loads((out / "stats.json").read_text())
    expected_faces = [SOURCES[i % 3].num_faces for i in range(4)]
    assert stats["count"] == stats["valid"] == 4 and stats["kind"] == "iflame" and stats["step"] == 7
    assert [m["faces"] for m in stats["meshes"]] == expected_faces
    assert stats["tokens"] == sum(9 * f + 1 for f in expected_faces) and stats["tokens_per_s"] > 0
    assert (out / "grid.png").is_file() and (out / "sample_003.ply").is_file()
    assert (out / "meshforge-stage.yaml").is_file()  # the CLI records the resolved config
    for i in range(4):
        raw = load_mesh_file(out / f"sample_{i:03d}.obj")
        # The written mesh is the sampled one: re-canonicalised, it gives the same tokens.
        tokens = encode_mesh(canonicalize(raw.vertices, raw.faces, bits=7))
        np.testing.assert_array_equal(tokens, encode_mesh(SOURCES[i % 3]))


def test_iflame_is_unconditional(iflame, tmp_path):
    command = "--device cpu sample --checkpoint {} --out {} --class-label chair"
    assert cli(command, tmp_path, tmp_path / "o") == 1
    assert not (tmp_path / "o").exists()


def test_dit_sampler_gets_its_options(monkeypatch, tmp_path):
    calls = {}

    def sample_meshes(model, meta, **options):
        calls.update(options, kind=meta["kind"])
        return [TETRAHEDRON] * options["n"]

    fake_checkpoint(monkeypatch, "ss-dit")
    fake_module(monkeypatch, "meshforge.sample.flow", sample_meshes=sample_meshes)
    out = tmp_path / "dit"
    options = "--n 2 --steps 4 --cfg-scale 2.5 --sampler heun --class-label chair"
    assert cli(f"--device cpu --seed 5 sample --checkpoint {{}} --out {{}} {options}", tmp_path, out) == 0
    assert calls == {"kind": "ss-dit", "n": 2, "batch_size": 16, "steps": 4, "cfg_scale": 2.5,
                     "sampler": "heun", "image": None, "class_label": "chair", "seed": 5,
                     "device": torch.device("cpu")}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == stats["watertight"] == 2 and stats["meshes_per_s"] > 0

    # Post-processing applies to what the sampler returns (a tetrahedron has 4 faces: under any budget).
    assert cli("--device cpu sample --checkpoint {} --out {} --n 1 --fill-holes --simplify 4", tmp_path, out) == 0
    assert json.loads((out / "stats.json").read_text())["watertight"] == 1

    missing_image = tmp_path / "nope.png"
    assert cli("--device cpu sample --checkpoint {} --out {} --image {}", tmp_path, out, missing_image) == 1


def test_other_kinds_cannot_sample(monkeypatch, tmp_path):
    fake_checkpoint(monkeypatch, "ss-vae")
    cfg = SampleStageConfig(checkpoint=tmp_path, out=tmp_path / "o")
    with pytest.raises(MeshforgeError, match="'ss-vae' checkpoint does not sample meshes"):
        sample_to_dir(cfg, torch.device("cpu"))


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"n": 0}, "at least 1"),
        ({"formats": ["stl"]}, "formats"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"image": "a.png", "class_label": "chair"}, "not both"),
        ({"simplify": 2}, "simplify"),
    ],
)
def test_config_validation(options, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict(SampleStageConfig, {"checkpoint": "ckpt", "out": "out", **options})


def test_sample_from_a_real_iflame_checkpoint(tmp_path):
    """The real model, checkpoint loader and sampler (untrained, tiny), through the CLI."""
    models = pytest.importorskip("meshforge.models.iflame")
    pytest.importorskip("meshforge.sample.iflame")
    from meshforge.config import to_dict

    torch.manual_seed(0)
    config = models.IFlameConfig(dim=32, n_heads=2, blocks=[1, 1, 2, 1, 1], max_seq_len=1008)
    meta = {"kind": "iflame", "model_config": to_dict(config)}
    model = models.IFlame(config)
    checkpoint.save_checkpoint(tmp_path / "run", step=5, model=model, meta=meta, state={}, keep=1)
    out = tmp_path / "samples"
    options = "--n 3 --batch-size 2 --max-faces 3 --formats obj,glb"
    assert cli(f"--device cpu sample --checkpoint {{}} --out {{}} {options}", tmp_path / "run", out) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == 3 and stats["step"] == 5 and stats["faces_max"] <= 3
    assert 0 < stats["tokens"] <= 3 * (9 * 3 + 1)
    assert len(list(out.glob("sample_*.glb"))) == 3 and (out / "grid.png").is_file()
