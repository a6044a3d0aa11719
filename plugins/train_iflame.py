"""`meshforge train-iflame`: train iFlame on a token dataset (``--gpus N`` for data parallelism)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.stages import RunContext, Stage
from meshforge.train.tasks.iflame import IFlameTask, TrainIFlameConfig
from meshforge.train.trainer import run_training_stage


def run(cfg: TrainIFlameConfig, ctx: RunContext) -> dict:
    return run_training_stage("train-iflame", cfg, ctx, lambda: IFlameTask(cfg), cli_module="meshforge_plugins.cli")


stage = Stage(
    name="train-iflame",
    help="Train iFlame (hourglass transformer over face tokens) on a token dataset; --gpus N for DDP.\n\n"
    "Model sizes go in the nested model section: --set model.dim=256, or a `model:` mapping in --config "
    "(--help-config lists its fields). "
    "Multi-node: torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --rdzv-backend c10d "
    "--rdzv-endpoint HOST:29500 -m meshforge_plugins.cli train-iflame --data D --out O",
    config=TrainIFlameConfig,
    run=run,
    inputs=("data",),
    outputs=("out",),
    workspace={
        "data": lambda o: workspace.newest_dataset("tokens"),
        "out": lambda o: workspace.training_out("iflame", o),
    },
)
