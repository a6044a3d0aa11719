"""The SS-VAE task: batches, multi-resolution, and the CLI path train-vae -> eval --metric recon."""

import json
import math

import pytest
import torch
from meshforge_plugins.cli import main

from meshforge.checkpoints import latest_checkpoint, load_ema
from meshforge.config import from_dict
from meshforge.data.sdf import voxelize
from meshforge.data.sdf_batch import collate
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate
from meshforge.errors import ConfigError
from meshforge.models.registry import load_model
from meshforge.models.ss_vae import SSVAE
from meshforge.train.logs import read_csv
from meshforge.train.tasks.vae import VAETask, VaeTaskConfig

TINY_MODEL = {"channels": [8, 16], "latent_channels": 4, "heads": 2, "window": 4, "attn_blocks": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    generate(root / "synth", n=6, seed=0, max_faces=60, families=["table", "stool", "cabinet"])
    voxelize_folder(SdfConfig(input=root / "synth", out=root / "sdf", resolution=32, band=2.5, val_fraction=0.3,
                              workers=1), "cpu")
    return root / "sdf"


def task(data, tmp_path, **kw) -> VAETask:
    return VAETask(from_dict(VaeTaskConfig, {"data": data, "out": tmp_path / "run", "batch_size": 2,
                                             "model": TINY_MODEL, **kw}))


def test_model_takes_the_band_of_the_data(data, tmp_path):
    t = task(data, tmp_path)
    assert t.model_config().band == SparseSDFDataset(data, "train").band == 2.5
    assert isinstance(t.build_model(), SSVAE)


def test_ranks_split_the_same_global_batch(data, tmp_path):
    t = task(data, tmp_path)
    whole = next(t.batches(0, 1, seed=3, start_step=2))
    halves = [next(t.batches(r, 2, seed=3, start_step=2)) for r in range(2)]
    assert halves[0]["batch_size"] == 1 and whole["batch_size"] == 2  # the train split holds 3 meshes
    second = halves[1]["coords"].clone()
    second[:, 0] += halves[0]["batch_size"]
    assert torch.equal(torch.cat([halves[0]["coords"], second]), whole["coords"])
    assert torch.equal(torch.cat([h["sdf"] for h in halves]), whole["sdf"])
    assert halves[0]["seeds"] + halves[1]["seeds"] == whole["seeds"]  # posterior noise per item


def test_multi_resolution_batches(data, tmp_path):
    t = task(data, tmp_path, resolutions=[16, 32], batch_size=2)
    stream = t.batches(0, 1, seed=1, start_step=0)
    seen = set()
    for step in range(4):
        b = next(stream)
        r = b["resolution"]
        seen.add(r)
        assert r == t.resolution_at(1, step)
        assert (b["coords"][:, 1:] < r).all() and (b["coords"][:, 1:] >= 0).all()
        assert b["sdf"].abs().max() <= 1 and len(b["sharp"]) == len(b["sdf"])
        assert (b["coords"][:, 0].diff() >= 0).all()
    assert seen == {16, 32}
    assert torch.equal(next(t.batches(0, 1, seed=1, start_step=3))["coords"], b["coords"])  # resumable


def test_lower_resolutions_voxelise_the_stored_mesh_with_the_datas_band(data, tmp_path):
    """Below the data's R a batch is the stored mesh voxelised at R (interpolating 32 -> 16 would keep
    only half the band): the same voxels and SDF as voxelising the mesh at 16 directly."""
    t = task(data, tmp_path, resolutions=[16], batch_size=1)
    item = t.item_at(t.train_set, 0, 16)
    vertices, faces = t.train_set.mesh(0)
    direct = voxelize(vertices, faces, 16, 2.5)
    assert item.resolution == 16 and torch.equal(item.coords, direct.coords) and torch.equal(item.sdf, direct.sdf)
    assert item.sdf.abs().max() * 16 > 0.9 * 2.5  # the whole band, in voxels of the new grid
    assert t.item_at(t.train_set, 0, 32).resolution == 32


def test_resolutions_must_fit_the_model(data, tmp_path):
    with pytest.raises(ConfigError, match="multiples"):
        from_dict(VaeTaskConfig, {"data": data, "out": tmp_path, "resolutions": [18], "model": {"channels": [8, 8, 8]}})


def test_loss_combines_weighted_terms(data, tmp_path):
    t = task(data, tmp_path, weight_kl=0.5, weight_sharp=2.0)
    torch.manual_seed(0)
    model = t.build_model()
    batch = next(t.batches(0, 1, seed=0, start_step=0))
    torch.manual_seed(1)
    loss, metrics = t.loss(model, batch)
    expected = metrics["in"] + metrics["extra"] + 2.0 * metrics["sharp"] + 0.5 * metrics["kl"] + metrics["prune"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["tokens"] == len(batch["sdf"]) and metrics["sharp"] >= 0


def test_collate_puts_sdf_in_band_units(data):
    item = SparseSDFDataset(data, "train")[0]
    b = collate([item], band=2.5)
    torch.testing.assert_close(b["sdf"], (item.sdf * 32 / 2.5).clamp(-1, 1))


def test_train_vae_then_eval_recon_through_the_cli(data, tmp_path):
    out = tmp_path / "run"
    args = ["--device", "cpu", "train-vae", "--data", str(data), "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1", "--eval-meshes", "1",
            "--resolutions", "16,32"]
    args += [f"--set=model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["loss"]) and "val_voxel_iou" in summary
    kind, model, meta = load_model(out, "cpu")
    assert kind == "ss-vae" and model.config.band == 2.5 and meta["step"] == 3

    report = tmp_path / "recon.json"
    assert main(["--device", "cpu", "eval", "--metric", "recon", "--checkpoint", str(out), "--data", str(data),
                 "--n", "1", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["meshes"] == 1 and result["fscore_tau"] > 0
    assert math.isfinite(result["input_sdf_chamfer"]) and result["input_sdf_fscore"] > 0.5
    assert result["failed"] == 1 or math.isfinite(result["chamfer"])  # 3 steps need not find a surface


@pytest.mark.slow
def test_two_processes_match_one(data, tmp_path, monkeypatch):
    """``--gpus 2`` follows the one process's loss curve: every rank trains each step at the same
    drawn resolution, and each item's posterior noise comes from its own seed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--device", "cpu", "train-vae", "--data", str(data), "--steps", "4", "--batch-size", "2",
            "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1", "--eval-meshes", "1",
            "--resolutions", "16,32", "--optimizer", "adamw", "--precision", "fp32", "--ema-decay", "0.9"]
    args += [f"--set=model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    runs = {gpus: tmp_path / f"gpus{gpus}" for gpus in (1, 2)}
    for gpus, out in runs.items():
        assert main([*args, "--out", str(out), "--gpus", str(gpus)]) == 0
    one, two = (json.loads((out / "summary.json").read_text()) for out in runs.values())
    assert two["world_size"] == 2
    # fp32 summation order of the all-reduced gradients (~1e-7 relative) carried by AdamW over 4
    # steps: 1e-5 on terms of order 1 covers it; the KL term (~1e2 at the start) gets 1e-5 relative.
    rows = [[r for r in read_csv(out / "metrics.csv") if "loss" in r] for out in runs.values()]
    assert len(rows[0]) == 4
    for key in ("loss", "in", "extra", "sharp", "prune", "kl"):
        a, b = ([r[key] for r in rs] for rs in rows)
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), key
    assert one["val_voxel_iou"] == pytest.approx(two["val_voxel_iou"], abs=1e-6)
    ema = [load_ema(latest_checkpoint(out)) for out in runs.values()]
    for name in ema[0]:
        torch.testing.assert_close(ema[1][name], ema[0][name], rtol=0, atol=1e-5)
