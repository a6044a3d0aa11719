"""`meshforge train-dit`: train the SS-DiT (rectified flow on SS-VAE latents; ``--gpus N`` for data parallelism)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.data.latents import is_latent_dataset
from meshforge.stages import RunContext, Stage
from meshforge.train.tasks.dit import DiTTask, DiTTaskConfig, needs_encoding, prepare_data
from meshforge.train.trainer import run_training_stage


def run(cfg: DiTTaskConfig, ctx: RunContext) -> dict:
    needs_encoding(cfg)  # bad --data or a missing --vae: one line, before any worker starts
    # Encoding happens in the training process(es): under --gpus N the launcher holds no GPU memory.
    return run_training_stage("train-dit", cfg, ctx, lambda: DiTTask(prepare_data(cfg, ctx.torch_device, ctx.seed)),
                              cli_module="meshforge_plugins.cli")


stage = Stage(
    name="train-dit",
    help="Train the SS-DiT (Direct3D-S2's sparse latent rectified-flow transformer) on SS-VAE latents; "
    "--gpus N for DDP.\n\n--data takes a latent dataset, or a sparse SDF dataset (from `meshforge sdf-voxelize`) "
    "that is first encoded with --vae into OUT/latents. Model sizes and conditioning go in the nested model "
    "section: --set model.dit.depth=12, --set model.dit.attention=full, --set model.cond.kind=class|image.",
    config=DiTTaskConfig,
    run=run,
    inputs=("data", "vae"),
    outputs=("out",),
    workspace={
        "data": lambda o: workspace.newest_dataset("sdf"),
        # A latent dataset names its VAE; an SDF dataset is encoded with the newest one.
        "vae": lambda o: None if is_latent_dataset(o["data"]) else workspace.newest_run("ss-vae"),
        "out": lambda o: workspace.training_out("ss-dit", o),
    },
)
