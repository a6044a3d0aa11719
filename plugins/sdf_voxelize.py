"""`meshforge sdf-voxelize`: a folder of meshes -> a narrow-band sparse SDF dataset (CPU or CUDA)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.stages import RunContext, Stage


def run(cfg: SdfConfig, ctx: RunContext) -> dict:
    return voxelize_folder(cfg, ctx.torch_device)


stage = Stage(
    name="sdf-voxelize",
    help="Voxelise every mesh under a folder into a resumable train/val dataset of narrow-band sparse SDFs.",
    config=SdfConfig,
    run=run,
    positional=("input",),
    inputs=("input",),
    outputs=("out",),
    workspace={"out": lambda o: o.get("input") and workspace.default_dataset_out("sdf", o["input"])},
)
