"""`meshforge tokenize`: a folder of meshes -> a memory-mappable face-token dataset."""

from __future__ import annotations

from meshforge import workspace
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.stages import RunContext, Stage


def run(cfg: TokenizeConfig, ctx: RunContext) -> dict:
    return tokenize_folder(cfg)


stage = Stage(
    name="tokenize",
    help="Canonicalise and tokenise every mesh under a folder into a train/val token dataset.",
    config=TokenizeConfig,
    run=run,
    positional=("input",),
    inputs=("input",),
    outputs=("out",),
    workspace={"out": lambda o: o.get("input") and workspace.default_dataset_out("tokens", o["input"])},
    field_help={
        "input": "Folder (or file) of meshes: obj/off/ply/stl/glb/gltf (or .gz), MeshGPT/MeshAnything pkl/npz.",
        "out": "Dataset folder to write (default: ./meshforge-data/tokens/NAME, NAME the input folder's name).",
        "bits": "Quantisation bits per coordinate (vocabulary 2**bits + 3).",
        "max_faces": "Skip meshes with more faces after canonicalisation.",
        "val_fraction": "Fraction of meshes (by content hash) in the val split, for sources without their own.",
        "workers": "Worker processes (0 = all cores).",
        "dedupe": "Keep identical canonical meshes once.",
        "resplit": "Split by content hash even a source with its own train/val split (MeshGPT's pickle).",
        "augment_scale_min": "Training augmentation: smallest per-axis scale.",
        "augment_scale_max": "Training augmentation: largest per-axis scale.",
        "augment_shift": "Training augmentation: largest per-axis shift (normalised units).",
    },
)
