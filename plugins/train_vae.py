"""`meshforge train-vae`: train the SS-VAE on a sparse SDF dataset (``--gpus N`` for data parallelism)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.stages import RunContext, Stage
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
)
