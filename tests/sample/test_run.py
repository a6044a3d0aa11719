"""`meshforge sample`: the sampler the checkpoint's model spec names, decoding, outputs; samplers and models are fakes
(plus one end-to-end test that runs once the real iFlame model and sampler are importable)."""

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from meshforge_plugins.cli import main
from torch import nn

from meshforge import checkpoints
from meshforge.config import from_dict
from meshforge.data.canonical import canonicalize
from meshforge.data.meshio import load_mesh_file
from meshforge.data.synth import mesh_bytes, synth_mesh
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import ConfigError, MeshforgeError
from meshforge.models.registry import LoadedModel
from meshforge.sample import run as sample_run
from meshforge.sample.run import SampleStageConfig, sample_to_dir

VOCAB = Vocab(7)
SOURCES = [canonicalize(*synth_mesh(f, 0, i), bits=7) for i, f in enumerate(["table", "chair", "lamp"])]
TETRAHEDRON = (np.eye(4, 3, k=-1), np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]))


def cli(text, *paths):
    """``main`` on a command line whose ``{}`` are filled with ``paths`` (kept whole if they hold spaces)."""
    words = text.split()
    fill = iter(paths)
    return main([str(next(fill)) if w == "{}" else w for w in words])


def fake_checkpoint(monkeypatch, kind):
    def load_model(path, device, ema=True):
        meta = {"kind": kind, "path": str(path), "step": 7, "model_config": {"vocab_size": VOCAB.size},
                "weights": "ema" if ema else "model"}
        model = nn.Linear(1, 1).to(device)
        model.config = types.SimpleNamespace(resolution=64)  # the latent grid an SS-DiT's sampler reads
        return LoadedModel(kind, model, meta)

    monkeypatch.setattr(sample_run, "load_model", load_model)
    monkeypatch.setattr(sample_run, "checkpoint_kind", lambda path: kind)


def fake_sampler(monkeypatch, **attributes):
    """Replace what meshforge.sample.run calls of a sampler module (``sample_tokens``, ``sample_meshes``)."""
    for name, value in attributes.items():
        monkeypatch.setattr(sample_run, name, value)


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

    def sample_tokens(model, vocab, cfg, device, prompts=None):
        calls.update(dataclasses.asdict(cfg), vocab=vocab, device=device)
        sequences = [encode_mesh(SOURCES[i % 3]) for i in range(cfg.n)]
        produced = sum(len(s) + 1 for s in sequences)
        return sequences, {"time_s": 0.5, "tokens": produced, "tokens_per_s": produced / 0.5, "steps": 9}

    fake_checkpoint(monkeypatch, "iflame")
    fake_sampler(monkeypatch, SampleConfig=FakeSampleConfig, sample_tokens=sample_tokens)
    return calls


def test_iflame_samples_are_decoded_and_written(iflame, tmp_path):
    out = tmp_path / "samples"
    options = "--n 4 --batch-size 2 --formats obj,ply --top-p 0.9 --max-faces 300 --no-cuda-graphs --no-ema"
    assert cli(f"--device cpu --seed 3 sample --checkpoint {{}} --out {{}} {options}", tmp_path, out) == 0
    assert iflame == {"n": 4, "batch_size": 2, "max_faces": 300, "temperature": 1.0, "top_k": None,
                      "top_p": 0.9, "seed": 3, "cuda_graphs": False, "vocab": VOCAB, "device": torch.device("cpu")}
    stats = json.loads((out / "stats.json").read_text())
    expected_faces = [SOURCES[i % 3].num_faces for i in range(4)]
    assert stats["count"] == stats["valid"] == 4 and stats["kind"] == "iflame" and stats["step"] == 7
    assert stats["weights"] == "model"  # --no-cuda-graphs ... --no-ema
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


def test_dit_sampler_gets_its_options(monkeypatch, tmp_path, capsys):
    calls = {}

    def sample_meshes(model, meta, *, options, on_structure, **arguments):
        calls.update(dataclasses.asdict(options), **arguments, kind=meta["kind"])
        on_structure([5, 150_000][: arguments["n"]])  # of a 64^3 grid: a surface's share, then 57% of it
        return [TETRAHEDRON] * arguments["n"]

    fake_checkpoint(monkeypatch, "ss-dit")
    fake_sampler(monkeypatch, sample_meshes=sample_meshes)
    out = tmp_path / "dit"
    options = "--n 2 --steps 4 --cfg-scale 2.5 --sampler heun --class-label chair"
    assert cli(f"--device cpu --seed 5 sample --checkpoint {{}} --out {{}} {options}", tmp_path, out) == 0
    printed = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "sample 1: the structure flow occupies 57% of the 64^3 latent grid (150,000 voxels)" in printed
    assert "sample 0:" not in printed
    assert calls == {"kind": "ss-dit", "n": 2, "batch_size": 16, "steps": 4, "cfg_scale": 2.5,
                     "sampler": "heun", "image": None, "class_label": "chair", "seed": 5,
                     "device": torch.device("cpu")}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == stats["watertight"] == 2 and stats["meshes_per_s"] > 0
    assert stats["latent_voxels"] == [5, 150_000]

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


def test_only_structures_no_surface_fills_are_reported():
    # 24 / 128 of the 128^3 grid: 393,216 voxels; a trained shape's shell is a few percent of the grid.
    warnings = sample_run.oversized_structures([90_000, 393_216, 1_048_576], 128, first=4)
    assert warnings == [("sample 6: the structure flow occupies 50% of the 128^3 latent grid (1,048,576 voxels), over "
                         "twice the shell of a box filling the grid: its checkpoint looks undertrained, and sampling so "
                         "many voxels is slow")]
    assert sample_run.oversized_structures([512], 8) == []  # a grid of 8: every count fits the bound


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
    checkpoints.save_checkpoint(tmp_path / "run", step=5, model=model, meta=meta, state={}, keep=1)
    out = tmp_path / "samples"
    options = "--n 3 --batch-size 2 --max-faces 3 --formats obj,glb"
    assert cli(f"--device cpu sample --checkpoint {{}} --out {{}} {options}", tmp_path / "run", out) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == 3 and stats["step"] == 5 and stats["faces_max"] <= 3 and stats["weights"] == "model"
    assert 0 < stats["tokens"] <= 3 * (9 * 3 + 1)
    assert len(list(out.glob("sample_*.glb"))) == 3 and (out / "grid.png").is_file()


def test_sample_completes_prompts_from_a_real_iflame_checkpoint(tmp_path, capsys):
    """--prompt with a mesh file: each completion holds the prompt's faces (prefilled in one pass),
    the prompt is written beside it, and stats.json records it; bad prompts are one-line errors."""
    from meshforge.config import to_dict
    from meshforge.data.tokens import decode_tokens
    from meshforge.models.iflame import IFlame, IFlameConfig
    from meshforge.sample.export import faces_of, mesh_from_canonical

    torch.manual_seed(0)
    config = IFlameConfig(dim=32, n_heads=2, blocks=[1, 1, 2, 1, 1], max_seq_len=1008)
    checkpoints.save_checkpoint(
        tmp_path / "run", step=5, model=IFlame(config), meta={"kind": "iflame", "model_config": to_dict(config)},
        state={}, keep=1,
    )
    source = tmp_path / "table.obj"
    vertices, faces = synth_mesh("table", 0, 0)
    source.write_bytes(mesh_bytes(vertices, faces, "obj"))
    out = tmp_path / "samples"
    options = "--n 2 --batch-size 2 --max-faces 6 --prompt-faces 3 --temperature 0"
    assert cli(f"--device cpu sample --checkpoint {{}} --out {{}} --prompt {{}} {options}", tmp_path / "run", out, source) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompt"] == str(source) and [m["prompt_faces"] for m in stats["meshes"]] == [3, 3]
    expected = mesh_from_canonical(decode_tokens(encode_mesh(canonicalize(vertices, faces, bits=7))[:27], VOCAB))

    def read(path):  # OBJ keeps 6 decimals: snap back to the 7-bit cell centres
        raw = load_mesh_file(path)
        return (np.round((raw.vertices + 0.5) * VOCAB.levels - 0.5) + 0.5) / VOCAB.levels - 0.5, raw.faces

    for name in ("sample_000", "sample_001"):
        prompt, completion = read(out / f"{name}_prompt.obj"), read(out / f"{name}.obj")
        assert len(prompt[1]) == 3 and faces_of(prompt, expected).all()
        assert 3 < len(completion[1]) <= 6 and faces_of(expected, completion).all()
    assert (out / "grid.png").is_file()

    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    capsys.readouterr()
    assert cli("--device cpu sample --checkpoint {} --out {} --prompt {}", tmp_path / "run", out, bad) == 1
    error = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert error.endswith(f"error: {bad}: unsupported file type '.txt'") and error.count("error:") == 1
    too_long = "--max-faces 3 --prompt-faces 3"
    assert cli(f"--device cpu sample --checkpoint {{}} --out {{}} --prompt {{}} {too_long}", tmp_path / "run", out, source) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "error: a prompt of 3 faces leaves nothing to sample under max_faces 3" in error and "Traceback" not in error


def test_prompts_from_a_token_dataset_are_its_val_meshes_in_turn(tmp_path):
    from meshforge.data.shards import TokenDataset
    from meshforge.data.synth import generate
    from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
    from meshforge.errors import InputError
    from meshforge.sample.run import prompt_tokens

    generate(tmp_path / "synth", n=6, seed=0, max_faces=120)
    tokenize_folder(TokenizeConfig(input=tmp_path / "synth", out=tmp_path / "tokens", val_fraction=0.5, max_faces=120, workers=1))
    val = TokenDataset(tmp_path / "tokens", "val")
    prompts = prompt_tokens(tmp_path / "tokens", len(val) + 1, 2, VOCAB)
    assert len(prompts) == len(val) + 1
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(prompt, val.tokens(i % len(val))[:18])
    coarse = prompt_tokens(tmp_path / "tokens", 1, 2, Vocab(5))[0]  # a 5-bit checkpoint: re-quantised
    assert len(coarse) == 18 and coarse.max() < 32
    with pytest.raises(InputError, match="no manifest.json"):
        prompt_tokens(tmp_path / "synth", 1, 2, VOCAB)
