"""`meshforge sample`: sample meshes from an iFlame or SS-DiT checkpoint into a folder."""

from __future__ import annotations

from meshforge import workspace
from meshforge.runtime import console
from meshforge.sample.export import GRID
from meshforge.sample.run import SampleStageConfig, sample_to_dir
from meshforge.stages import RunContext, Stage


def run(cfg: SampleStageConfig, ctx: RunContext) -> dict:
    stats = sample_to_dir(cfg, ctx.torch_device, seed=ctx.seed)
    console.print(
        f"sampled {stats['count']} meshes ({stats['valid']} valid, {stats['watertight']} watertight) "
        f"into {cfg.out}; grid: {cfg.out / GRID}", highlight=False, soft_wrap=True,
    )
    return stats


stage = Stage(
    name="sample",
    help="Sample meshes from a checkpoint (iFlame or SS-DiT): mesh files, grid.png and stats.json.",
    config=SampleStageConfig,
    run=run,
    inputs=("checkpoint", "image", "prompt"),
    outputs=("out",),
    workspace={
        "checkpoint": lambda o: workspace.newest_run("iflame", "ss-dit"),
        "out": lambda o: workspace.run_samples(o["checkpoint"]),
    },
)
