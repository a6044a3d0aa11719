"""The SS-DiT task: encoding SDF datasets to latents, batches, learning, checkpoints, and the CLI
path sdf dataset -> train-dit (encodes with the VAE) -> sample --image."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from meshforge_plugins.cli import main

from meshforge.checkpoints import latest_checkpoint, load_ema, save_checkpoint
from meshforge.config import from_dict, to_dict
from meshforge.data.latents import LatentDataset
from meshforge.data.sdf_batch import batch_tensor, collate
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate
from meshforge.errors import ConfigError, InputError
from meshforge.models.registry import load_model
from meshforge.models.ss_dit import LatentFlow, flow_loss_terms
from meshforge.models.ss_vae import SSVAE, SSVAEConfig
from meshforge.train.config import TrainConfig
from meshforge.train.latents import encode_dataset
from meshforge.train.logs import read_csv
from meshforge.train.tasks.dit import DiTTask, DiTTaskConfig, prepare_data
from meshforge.train.trainer import train

FAMILIES = ["table", "stool", "cabinet"]
TINY_MODEL = {
    "dit": {"dim": 32, "depth": 2, "heads": 4, "kv_heads": 2, "attention": "window", "window": 4},
    "structure": {"dim": 32, "depth": 1, "heads": 2, "kv_heads": 2, "attention": "full"},
    "structure_patch": 2,
}
IMAGE_COND = {"kind": "image", "dim": 16, "image_size": 28,
              "vit": {"dim": 32, "depth": 1, "heads": 2, "patch": 14, "mlp_hidden": 64, "pos_grid": 2}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A sparse SDF dataset at R = 16, an (untrained) SS-VAE with f = 2, and its 8^3 latents."""
    root = tmp_path_factory.mktemp("dit")
    generate(root / "synth", n=6, seed=0, max_faces=60, families=FAMILIES)
    voxelize_folder(SdfConfig(input=root / "synth", out=root / "sdf", resolution=16, band=2.0, val_fraction=0.3,
                              workers=1), "cpu")
    cfg = SSVAEConfig(channels=[8, 8], latent_channels=4, heads=2, window=4, attn_blocks=1, band=2.0, conv_backend="torch")
    torch.manual_seed(0)
    save_checkpoint(root / "vae", step=1, model=SSVAE(cfg), meta={"kind": "ss-vae", "model_config": to_dict(cfg)},
                    state={}, keep=1)
    encode_dataset(root / "vae", root / "sdf", root / "latents", "cpu", views=2, image_size=28, batch_size=2)
    return root


def task(data, tmp_path, cond=None, **kw) -> DiTTask:
    model = {**TINY_MODEL, "cond": cond or {"kind": "class", "dim": 16}}
    return DiTTask(from_dict(DiTTaskConfig, {"data": data / "latents", "out": tmp_path / "run", "batch_size": 2,
                                             "model": model, **kw}))


def test_encode_writes_the_latent_dataset(data):
    sdf, latents = SparseSDFDataset(data / "sdf", "train"), LatentDataset(data / "latents", "train")
    manifest = latents.manifest
    assert manifest["resolution"] == 8 and manifest["data_resolution"] == 16 and manifest["factor"] == 2
    assert manifest["classes"] == sorted(FAMILIES) and manifest["views"] == 2
    assert manifest["vae_checkpoint"].endswith("step_0000001")
    assert len(latents) == len(sdf) and latents.names == sdf.names
    assert [latents.classes[latents[i].label] for i in range(len(latents))] == [n.split("/")[0] for n in sdf.names]

    _, vae, _ = load_model(data / "vae")
    with torch.no_grad():
        expected = vae.encode(batch_tensor(collate([sdf[1]], sdf.band)))
    item = latents[1]
    np.testing.assert_array_equal(item.coords, expected.coords[:, 1:].numpy())
    np.testing.assert_allclose(item.feats, expected.feats.numpy(), rtol=1e-6, atol=1e-6)
    assert item.coords.max() < 8 and item.coords.min() >= 0

    every = np.concatenate([latents[i].feats for i in range(len(latents))])
    np.testing.assert_allclose(manifest["mean"], every.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(manifest["std"], every.std(0), rtol=1e-4, atol=1e-5)
    image = latents.image(0, 1)
    assert image.shape == (28, 28, 4) and image.dtype == np.uint8 and 0 < (image[..., 3] > 0).mean() < 1


def test_model_config_comes_from_the_data(data, tmp_path):
    t = task(data, tmp_path)
    cfg = t.model_config()
    assert cfg.latent_channels == 4 and cfg.resolution == 8 and cfg.cond.classes == sorted(FAMILIES)
    assert cfg.vae_checkpoint.endswith("step_0000001") and len(cfg.latent_std) == 4
    assert isinstance(t.build_model(), LatentFlow)


def test_ranks_split_the_same_global_batch(data, tmp_path):
    t = task(data, tmp_path, cond=IMAGE_COND)
    whole = next(t.batches(0, 1, seed=3, start_step=2))
    halves = [next(t.batches(r, 2, seed=3, start_step=2)) for r in range(2)]
    second = halves[1]["coords"].clone()
    second[:, 0] += 1
    assert torch.equal(torch.cat([halves[0]["coords"], second]), whole["coords"])
    assert torch.equal(torch.cat([h["feats"] for h in halves]), whole["feats"])
    assert torch.equal(torch.cat([h["condition"] for h in halves]), whole["condition"])
    assert whole["condition"].shape == (2, 4, 28, 28) and whole["condition"].dtype == torch.uint8
    # Each item's timesteps, dropout and noise seed belong to its place in the global batch.
    assert torch.equal(torch.cat([h["t"] for h in halves]), whole["t"]) and whole["t"].shape == (2, 2)
    assert torch.equal(torch.cat([h["drop"] for h in halves]), whole["drop"])
    assert halves[0]["seeds"] + halves[1]["seeds"] == whole["seeds"] and len(set(whole["seeds"])) == 2


def fixed_loss(model: LatentFlow, batch: dict) -> float:
    """Both flow losses at fixed times and noise (no condition dropout)."""
    g = torch.Generator().manual_seed(0)
    b = batch["batch_size"]
    model = model.eval().requires_grad_(False)
    cond = model.conditioner(batch["condition"], torch.zeros(b, dtype=torch.bool))
    t = torch.linspace(0.2, 0.8, b)
    total = 0.0
    for denoiser, x in ((model.dit, model.latent_tensor(batch["coords"], model.normalize(batch["feats"]), b)),
                        (model.structure, model.structure_tensor(batch["coords"], b))):
        s, n = flow_loss_terms(denoiser, x, t, cond, torch.randn(x.feats.shape, generator=g))
        total += (s / n).item()
    return total


def test_training_overfits_a_tiny_set(data, tmp_path):
    t = task(data, tmp_path, batch_size=2, cond_dropout=0.0, eval_meshes=1)
    cfg = TrainConfig.from_options(from_dict(DiTTaskConfig, {
        "data": data / "latents", "out": tmp_path / "run", "steps": 20, "batch_size": 2, "lr": 3e-3,
        "warmup_steps": 2, "optimizer": "adamw", "weight_decay": 0.0, "log_every": 10, "eval_every": 0,
        "checkpoint_every": 20, "precision": "fp32"}), seed=0)
    t.train_set.index = t.train_set.index[:2]  # two shapes, seen every step
    batch = next(t.batches(0, 1, seed=0, start_step=0))
    torch.manual_seed(0)
    before = fixed_loss(t.build_model(), batch)
    summary = train(t, cfg, tmp_path / "run", device="cpu")
    kind, model, meta = load_model(tmp_path / "run")
    with torch.no_grad():
        after = fixed_loss(model, batch)
    assert kind == "ss-dit" and meta["step"] == 20
    assert after < 0.8 * before, (before, after)  # at the start both flows sit at var(eps) + var(x0) = 2
    assert math.isfinite(summary["val_latent"]) and math.isfinite(summary["val_structure"])
    assert model.config.cond.classes == sorted(FAMILIES)
    assert torch.equal(model.latent_mean, torch.tensor(LatentDataset(data / "latents").manifest["mean"]))


def test_image_conditioning_with_dinov2_needs_a_local_checkpoint(data, tmp_path):
    with pytest.raises(ConfigError, match="encoder_checkpoint"):
        task(data, tmp_path, cond={**IMAGE_COND, "encoder": "dinov2"})
    missing = tmp_path / "weights" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(InputError, match=r"dinov2_vits14_pretrain\.pth: no such image encoder checkpoint"):
        task(data, tmp_path, cond={**IMAGE_COND, "encoder": "dinov2", "encoder_checkpoint": str(missing)})


def test_sdf_data_needs_a_vae_to_encode(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty workspace: no VAE run to take by default
    assert main(["--device", "cpu", "train-dit", "--data", str(data / "sdf"), "--out", str(tmp_path / "run")]) != 0
    assert capsys.readouterr().err == "error: no ss-vae checkpoint under ./runs: run `meshforge train-vae` first\n"
    with pytest.raises(ConfigError, match="is a sparse SDF dataset: pass --vae"):
        prepare_data(DiTTaskConfig(data=data / "sdf", out=tmp_path / "run"), torch.device("cpu"), 0)


def test_train_dit_from_sdf_data_then_sample_from_an_image(data, tmp_path):
    out = tmp_path / "run"
    args = ["--device", "cpu", "train-dit", "--data", str(data / "sdf"), "--vae", str(data / "vae"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1",
            "--eval-meshes", "1", "--views", "2", "--set", "model.cond.image_size=28"]
    args += [f"--set=model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    args += [f"--set=model.cond.{k}={json.dumps(v)}" for k, v in IMAGE_COND.items() if k != "image_size"]
    assert main(args) == 0
    latents = LatentDataset(out / "latents")
    assert latents.views == 2 and latents.manifest["source"] == str((data / "sdf").resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["loss"]) and "val_latent" in summary

    from PIL import Image

    Image.fromarray(latents.image(0, 0)).save(tmp_path / "query.png")
    samples = tmp_path / "samples"
    assert main(["--device", "cpu", "sample", "--checkpoint", str(out), "--out", str(samples), "--n", "2",
                 "--steps", "2", "--cfg-scale", "3", "--image", str(tmp_path / "query.png")]) == 0
    stats = json.loads((samples / "stats.json").read_text())
    assert (samples / "grid.png").is_file() and stats["kind"] == "ss-dit" and len(stats["meshes"]) == 2


@pytest.mark.slow
def test_two_processes_match_one_encode_once_and_resume_on_either(data, tmp_path, monkeypatch):
    """``--gpus 2`` from SDF data: rank 0 encodes the latents while rank 1 waits, and the loss curve
    is the one process's: every item's timesteps, dropout and noise come from its own seed, which
    also lets a run resume on another number of processes and stay on that curve."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--device", "cpu", "train-dit", "--data", str(data / "sdf"), "--vae", str(data / "vae"), "--steps", "4",
            "--batch-size", "2", "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1", "--eval-meshes", "1",
            "--optimizer", "adamw", "--precision", "fp32", "--ema-decay", "0.9", "--cond-dropout", "0.5",
            "--checkpoint-every", "2"]
    args += [f"--set=model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    args += ["--set", "model.cond.kind=class", "--set", "model.cond.dim=16"]
    runs = {gpus: tmp_path / f"gpus{gpus}" for gpus in (1, 2)}
    for gpus, out in runs.items():
        assert main([*args, "--out", str(out), "--gpus", str(gpus)]) == 0
    one, two = (json.loads((out / "summary.json").read_text()) for out in runs.values())
    assert two["world_size"] == 2 and not (runs[2] / "latents").with_suffix(".tmp").exists()
    assert LatentDataset(runs[2] / "latents").manifest["counts"] == LatentDataset(runs[1] / "latents").manifest["counts"]
    # The gradients differ only by fp32 summation order (one batch vs two halves all-reduced),
    # ~1e-7 relative; AdamW keeps that in fp32 over 4 steps: 1e-5 on losses of order 1 covers it.
    for key in ("latent", "structure"):
        curve = [[r[key] for r in read_csv(out / "metrics.csv") if key in r] for out in runs.values()]
        assert len(curve[0]) == 4 and curve[0] == pytest.approx(curve[1], abs=1e-5), key
        assert one[f"val_{key}"] == pytest.approx(two[f"val_{key}"], abs=1e-5)
    ema = [load_ema(latest_checkpoint(out)) for out in runs.values()]
    for name in ema[0]:
        torch.testing.assert_close(ema[1][name], ema[0][name], rtol=0, atol=1e-5)

    # The one-process run as if stopped at step 2, resumed on two processes: steps 3 and 4 as before.
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[1], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    assert main([*args, "--out", str(resumed), "--gpus", "2", "--resume"]) == 0
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 2
    curve = [[(r["step"], r["latent"]) for r in read_csv(out / "metrics.csv") if "latent" in r] for out in (runs[1], resumed)]
    assert [s for s, _ in curve[1]] == [1, 2, 3, 4]
    assert [v for _, v in curve[1]] == pytest.approx([v for _, v in curve[0]], abs=1e-5)


def free_local_port() -> int:
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"no local TCP sockets here ({exc}): torchrun's rendezvous needs one")


@pytest.mark.slow
def test_two_nodes_through_torchrun_match_one_process(data, tmp_path, monkeypatch):
    """The multi-node command of meshforge.train.distributed's docstring, as two "nodes" (torchrun
    launchers of one process each, c10d rendezvous) on localhost sharing OUT: the SDF data is encoded
    once, by rank 0, and the run follows the one-process loss curve."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stage = ["train-dit", "--data", str(data / "sdf"), "--vae", str(data / "vae"), "--steps", "3", "--batch-size", "2",
             "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1", "--eval-meshes", "1",
             "--optimizer", "adamw", "--precision", "fp32", "--set", "model.cond.kind=class", "--set", "model.cond.dim=16",
             *(f"--set=model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items())]
    assert main(["--device", "cpu", *stage, "--out", str(tmp_path / "one")]) == 0

    endpoint = f"127.0.0.1:{free_local_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mf-test",
             "-m", "meshforge_plugins.cli", "--device", "cpu", *stage, "--out", str(tmp_path / "nodes")],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert sum(o.count("encoded ") for o in outputs) == 1 and sum(o.count("waiting for rank 0") for o in outputs) == 1
    assert json.loads((tmp_path / "nodes" / "summary.json").read_text())["world_size"] == 2
    one, two = ([r["loss"] for r in read_csv(tmp_path / name / "metrics.csv") if "loss" in r] for name in ("one", "nodes"))
    assert len(one) == 3 and one == pytest.approx(two, abs=1e-5)  # the tolerance of the --gpus 2 test above


def test_sdf_data_without_a_vae_under_gpus_is_one_line_before_any_worker(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--device", "cpu", "train-dit", "--data", str(data / "synth"), "--vae", str(data / "vae"),
                 "--out", str(out), "--gpus", "2"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {data / 'synth'}: neither a latent dataset nor a sparse SDF dataset (from `meshforge sdf-voxelize`)\n"
    assert not (out / "launch.yaml").exists()  # refused before the launch
