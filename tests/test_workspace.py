"""The workspace convention: the design card's commands chain with no paths."""

import json
import os
from pathlib import Path

import pytest
from meshforge_plugins.cli import build_config, main

from meshforge import workspace
from meshforge.data.synth import generate
from meshforge.errors import MeshforgeError
from meshforge.stages import RunContext, discover_stages

# A model small enough for a CPU test; everything else the stages pick themselves.
TINY = ["--steps", "2", "--batch-size", "4", "--eval-every", "0", "--warmup-steps", "1", "--max-faces", "20",
        "--eval-meshes", "2", "--set", "model.dim=32", "--set", "model.n_heads=2",
        "--set", "model.blocks=[1,1,2,1,1]", "--set", "model.max_seq_len=189"]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_inputs_say_which_command_makes_them(cwd):
    with pytest.raises(MeshforgeError, match=r"no tokenized dataset under ./meshforge-data/tokens: "
                                             r"run `meshforge tokenize DIR` first"):
        workspace.newest_dataset("tokens")
    with pytest.raises(MeshforgeError, match=r"no iflame checkpoint under ./runs: run `meshforge train-iflame` first"):
        workspace.newest_run("iflame")


def test_names_and_numbering(cwd):
    assert workspace.default_dataset_out("tokens", Path("shapenet/")) == Path("meshforge-data/tokens/shapenet")
    assert workspace.default_dataset_out("sdf", Path("data/chairs.npz")) == Path("meshforge-data/sdf/chairs")
    assert workspace.next_run_dir("iflame") == Path("runs/iflame-1")
    for name in ("iflame-1", "iflame-3", "iflame-x", "vae-7"):
        (cwd / "runs" / name).mkdir(parents=True)
    assert workspace.next_run_dir("iflame") == Path("runs/iflame-4")


def test_newest_dataset_is_the_last_written(cwd):
    for i, name in enumerate(("b", "a")):
        root = cwd / "meshforge-data" / "tokens" / name
        root.mkdir(parents=True)
        (root / "manifest.json").write_text("{}")
        os.utime(root / "manifest.json", (1000 + i, 1000 + i))
    (cwd / "meshforge-data" / "tokens" / "unfinished").mkdir()  # no manifest: not a dataset
    assert workspace.newest_dataset("tokens") == Path("meshforge-data/tokens/a")


def fake_run(root: Path, kind: str, mtime: float, data: str = "d") -> None:
    step = root / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    (step / "meta.json").write_text(json.dumps({"kind": kind, "task_config": {"data": data}}))
    (root / "checkpoints" / "latest").write_text("step_0000001\n")
    os.utime(root / "checkpoints" / "latest", (mtime, mtime))


def test_newest_run_filters_by_kind_and_finds_recipe_steps(cwd):
    fake_run(cwd / "runs" / "iflame-1", "iflame", 1000, data="tokens-1")
    fake_run(cwd / "runs" / "quickstart" / "iflame", "iflame", 2000, data="tokens-q")
    fake_run(cwd / "runs" / "vae-1", "ss-vae", 3000)
    assert workspace.newest_run("iflame") == Path("runs/quickstart/iflame")
    assert workspace.newest_run("iflame", "ss-vae") == Path("runs/vae-1")
    assert workspace.run_dataset(Path("runs/iflame-1/checkpoints/step_0000001")) == Path("tokens-1")
    assert workspace.run_samples(Path("runs/iflame-1/checkpoints")) == Path("runs/iflame-1/samples")
    assert workspace.samples_dataset(Path("runs/iflame-1/samples")) == Path("tokens-1")
    assert workspace.training_out("iflame", {"resume": True}) == Path("runs/quickstart/iflame")
    assert workspace.training_out("iflame", {}) == Path("runs/iflame-2")


def resolve(argv_options: dict, stage: str):
    return build_config(discover_stages().stages[stage], argv_options, None, [], RunContext())


def test_the_design_card_lines_resolve_their_inputs(cwd, capsys):
    """`tokenize shapenet/`, `train-iflame --gpus 4`, `sample --n 16`, `eval --metric face-acc`, as typed."""
    assert resolve({"input": Path("shapenet/")}, "tokenize").out == Path("meshforge-data/tokens/shapenet")
    data = cwd / "meshforge-data" / "tokens" / "shapenet"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    train = resolve({"gpus": 4}, "train-iflame")
    assert (train.data, train.out, train.gpus) == (Path("meshforge-data/tokens/shapenet"), Path("runs/iflame-1"), 4)
    fake_run(cwd / "runs" / "iflame-1", "iflame", 1000, data=str(train.data))
    sample = resolve({"n": 16}, "sample")
    assert (sample.checkpoint, sample.out, sample.n) == (Path("runs/iflame-1"), Path("runs/iflame-1/samples"), 16)
    scored = resolve({"metric": "face-acc"}, "eval")
    assert (scored.checkpoint, scored.data) == (Path("runs/iflame-1"), Path("meshforge-data/tokens/shapenet"))
    generative = resolve({"metric": "cov-mmd-1nna"}, "eval")
    assert (generative.checkpoint, generative.samples, generative.data) == (
        None, Path("runs/iflame-1/samples"), Path("meshforge-data/tokens/shapenet"))
    err = capsys.readouterr().err
    assert "train-iflame: --data meshforge-data/tokens/shapenet (workspace default)" in err
    assert "sample: --checkpoint runs/iflame-1 (workspace default)" in err
    # Explicit paths win.
    assert resolve({"metric": "face-acc", "data": Path("elsewhere")}, "eval").data == Path("elsewhere")


def test_missing_workspace_input_is_one_line_from_the_cli(cwd, capsys):
    assert main(["eval", "--metric", "face-acc"]) == 1
    err = capsys.readouterr().err
    assert err == "error: no iflame checkpoint under ./runs: run `meshforge train-iflame` first\n"


@pytest.mark.slow
def test_the_four_commands_chain_through_the_workspace(cwd, capsys):
    generate(cwd / "shapenet", n=8, seed=0, max_faces=100, families=["table", "lamp"])
    assert main(["tokenize", "shapenet/", "--workers", "1", "--val-fraction", "0.25"]) == 0
    assert main(["--device", "cpu", "train-iflame", *TINY]) == 0
    assert main(["--device", "cpu", "sample", "--n", "4"]) == 0
    assert main(["--device", "cpu", "eval", "--metric", "face-acc"]) == 0
    out, err = capsys.readouterr()
    assert (cwd / "runs" / "iflame-1" / "checkpoints" / "latest").is_file()
    stats = json.loads((cwd / "runs" / "iflame-1" / "samples" / "stats.json").read_text())
    assert stats["count"] == 4
    assert "into runs/iflame-1/samples; grid: runs/iflame-1/samples/grid.png" in err
    assert "face-acc: " in out
