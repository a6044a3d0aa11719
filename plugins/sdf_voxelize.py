"""`meshforge sdf-voxelize`: a folder of meshes -> a narrow-band sparse SDF dataset (CPU or CUDA)."""

from __future__ import annotations

from meshforge import workspace
from meshforge.data.sdf import SdfConfig, voxelize_folder
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
    field_help={
        "input": "Folder (or file) of meshes: obj/off/ply/stl/glb/gltf (or .gz), MeshGPT/MeshAnything pkl/npz.",
        "out": "Dataset folder to write (an unfinished one with the same settings is resumed).",
        "resolution": "Grid resolution R (voxels per side).",
        "band": "Narrow band tau in voxels: keep voxels with |sdf| < tau / R (> sqrt(3) for watertight re-meshing).",
        "sharp_angle_deg": "Dihedral angle (degrees) above which an edge is sharp.",
        "sharp_radius": "Flag band voxels within this many voxels of a sharp edge.",
        "fill": "Scale of the normalised mesh inside the grid (the margin keeps the band inside it).",
        "max_faces": "Skip meshes with more faces (the sign test costs voxels x faces).",
        "val_fraction": "Fraction of meshes (by content hash, as tokenize) in the val split.",
        "resplit": "Split by content hash even a source with its own train/val split (MeshGPT's pickle).",
        "workers": "CPU worker processes (0 = all cores); the CUDA path uses one process.",
        "sign_backend": "Winding numbers: torch (the reference), pcu (point-cloud-utils' fast winding numbers, "
        "CPU), auto (pcu on the CPU when installed).",
    },
)
