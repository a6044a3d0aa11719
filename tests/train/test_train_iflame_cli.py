"""End to end through the CLI: tokens -> train-iflame -> eval, resume, and --gpus 2 on CPU."""

import json

import pytest

pytest.importorskip("meshforge.models.iflame")

from meshforge_plugins.cli import main

from meshforge.data.synth import generate
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.train.logs import read_csv

# A model and sequences (the first 20 faces of each mesh) small enough for many CPU steps per second.
TINY = ["--set", "model.dim=32", "--set", "model.n_heads=2", "--set", "model.blocks=[1,1,2,1,1]",
        "--set", "model.max_seq_len=189", "--max-faces", "20", "--eval-meshes", "3"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    generate(root / "synth", n=12, seed=0, max_faces=100, families=["table", "lamp", "bench", "cabinet"])
    tokenize_folder(TokenizeConfig(input=root / "synth", out=root / "tokens", max_faces=100, val_fraction=0.25, workers=1))
    return root / "tokens"


def train_args(tokens, out, steps, *extra):
    return ["--device", "cpu", "train-iflame", "--data", str(tokens), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "4", "--eval-every", "0",
            "--warmup-steps", "2", *TINY, *extra]


def losses(out):
    return [r["loss"] for r in read_csv(out / "metrics.csv") if "loss" in r]


def test_train_then_eval_face_acc(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tokens, out, 6)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert (out / "curves.png").is_file() and (out / "config.yaml").is_file()
    assert len(losses(out)) == 6

    capsys.readouterr()
    assert main(["--device", "cpu", "eval", "--metric", "face-acc", "--checkpoint", str(out), "--data", str(tokens),
                 "--max-faces", "20", "--n", "3", "--out", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert f"face-acc: {result['face_acc']:.4f}" in printed
    # The trainer's final evaluation and `meshforge eval` measure the same thing.
    assert result["face_acc"] == pytest.approx(summary["val_face_acc"], abs=1e-6)
    assert result["step"] == 6 and result["kind"] == "iflame"
    # Without --max-faces, meshes longer than the model (189 positions) are scored on what fits.
    assert main(["--device", "cpu", "eval", "--metric", "face-acc", "--checkpoint", str(out), "--data", str(tokens),
                 "--n", "3"]) == 0


def test_resume_through_the_cli_extends_the_run(tokens, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tokens, out, 4)) == 0
    assert main(train_args(tokens, out, 8, "--resume")) == 0
    assert len(losses(out)) == 8
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4


@pytest.mark.slow
def test_two_processes_match_one(tokens, tmp_path, monkeypatch):
    # AdamW: Muon orthogonalises in bf16, where the last-bit differences of a gradient all-reduce
    # can round differently and move the loss by ~1e-5 relative (the toy DDP test covers Muon).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(train_args(tokens, tmp_path / "one", 4, "--optimizer", "adamw")) == 0
    assert main(train_args(tokens, tmp_path / "two", 4, "--optimizer", "adamw", "--gpus", "2")) == 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)


def test_gpus_beyond_the_visible_cuda_devices_is_one_line(tokens, tmp_path, capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    args = ["train-iflame", "--data", str(tokens), "--out", str(tmp_path / "run"), "--gpus", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: --gpus 2 but only {torch.cuda.device_count()} CUDA devices are visible "
                        "(for 2 CPU processes pass --device cpu)\n")
    assert not (tmp_path / "run").exists()


def test_eval_and_sample_fit_the_checkpoint(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tokens, out, 2, "--max-faces", "4")) == 0  # few faces: sampling stays quick
    # No --max-faces: both take the 4 faces the model was trained on, not a default it cannot hold.
    assert main(["--device", "cpu", "eval", "--metric", "face-acc", "--checkpoint", str(out), "--n", "2",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["max_faces"] == 4
    assert main(["--device", "cpu", "sample", "--checkpoint", str(out), "--n", "2", "--out", str(tmp_path / "s")]) == 0
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["count"] == 2 and stats["faces_max"] <= 4
    assert f"sampled 2 meshes ({stats['valid']} valid" in capsys.readouterr().err
    # A dataset of another vocabulary is refused up front, naming both.
    eight = tmp_path / "tokens8"
    tokenize_folder(TokenizeConfig(input=tokens.parent / "synth", out=eight, bits=8, max_faces=100, val_fraction=0.25,
                                   workers=1))
    capsys.readouterr()
    assert main(["--device", "cpu", "eval", "--metric", "face-acc", "--checkpoint", str(out), "--data", str(eight)]) == 1
    err = capsys.readouterr().err
    assert f"error: {eight} holds 8-bit tokens (vocabulary 259) but checkpoint" in err
    assert "was trained on a vocabulary of 131" in err and err.count("\n") == 1


def test_a_batch_larger_than_the_training_split_is_one_line(tokens, tmp_path, capsys):
    assert main(train_args(tokens, tmp_path / "run", 2, "--batch-size", "1600")) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: --batch-size 1600 is more than the 7 training items of {tokens}: "
                        "pass --batch-size 7 or less\n"), err


def test_eval_and_sample_use_the_ema_weights_unless_told_not_to(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tokens, out, 6, "--ema-decay", "0.9")) == 0
    assert (out / "checkpoints" / "step_0000006" / "ema.safetensors").is_file()
    results = {}
    for flag in ("--ema", "--no-ema"):
        capsys.readouterr()
        target = tmp_path / f"eval{flag}.json"
        assert main(["--device", "cpu", "eval", "--metric", "face-acc", "--checkpoint", str(out), "--data", str(tokens),
                     "--max-faces", "20", "--n", "3", "--out", str(target), flag]) == 0
        results[flag] = json.loads(target.read_text())
        assert f"weights: {results[flag]['weights']}" in capsys.readouterr().out
    assert results["--ema"]["weights"] == "ema" and results["--no-ema"]["weights"] == "model"
    assert results["--ema"]["loss"] != results["--no-ema"]["loss"]
    samples = tmp_path / "samples"
    assert main(["--device", "cpu", "sample", "--checkpoint", str(out), "--out", str(samples), "--n", "1",
                 "--max-faces", "2"]) == 0
    assert json.loads((samples / "stats.json").read_text())["weights"] == "ema"
