"""`meshforge train-vae`: train the SS-VAE on a sparse SDF dataset (``--gpus N`` for data parallelism)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.stages import RunContext, Stage
from meshforge.train.config import TRAIN_FIELD_HELP
from meshforge.train.tasks.vae import VAETask, VaeTaskConfig
from meshforge.train.trainer import run_training_stage


def run(cfg: VaeTaskConfig, ctx: RunContext) -> dict:
    return run_training_stage("train-vae", cfg, ctx, lambda: VAETask(cfg), cli_module="meshforge_plugins.cli")


stage = Stage(
    name="train-vae",
    help="Train the SS-VAE (sparse SDF autoencoder of Direct3D-S2) on a dataset from `meshforge sdf-voxelize`; "
    "--gpus N for DDP.\n\nModel sizes go in the nested model section: --set model.channels=[32,64,128], "
    "or a `model:` mapping in --config.",
    config=VaeTaskConfig,
    run=run,
    inputs=("data",),
    outputs=("out",),
    workspace={
        "data": lambda o: workspace.newest_dataset("sdf"),
        "out": lambda o: workspace.training_out("ss-vae", o),
    },
    field_help={
        **TRAIN_FIELD_HELP,
        "data": "Sparse SDF dataset folder (from `meshforge sdf-voxelize`).",
        "out": "Run folder: checkpoints/, metrics.csv, curves.png, config.yaml, summary.json.",
        "resume": "Continue from OUT/checkpoints/latest (same loss curve as an uninterrupted run).",
        "resolutions": "Grid resolutions drawn at random per step, e.g. 256,384,512 (default: the data's); "
        "each a multiple of the model's downsampling factor.",
        "weight_in": "Weight of the SDF MSE on the input voxels.",
        "weight_extra": "Weight of the SDF MSE on extra (predicted, not in the input) voxels.",
        "weight_sharp": "Extra weight of the SDF MSE on voxels near sharp edges.",
        "weight_kl": "Weight of the KL divergence of the latent.",
        "weight_prune": "Weight of the BCE of the decoder's voxel-existence (pruning) logits.",
        "eval_meshes": "Val shapes per evaluation (0: all).",
    },
)
