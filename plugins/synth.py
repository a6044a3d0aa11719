"""`meshforge synth`: the built-in procedural dataset of low-poly furniture."""

from __future__ import annotations

from meshforge.data.synth import SynthConfig, generate
from meshforge.stages import RunContext, Stage


def run(cfg: SynthConfig, ctx: RunContext) -> dict:
    return generate(
        cfg.out,
        cfg.n,
        ctx.seed,
        cfg.formats,
        families=cfg.families,
        min_faces=cfg.min_faces,
        max_faces=cfg.max_faces,
    )


stage = Stage(
    name="synth",
    help="Write a procedural dataset of low-poly furniture meshes (8 families, labelled).",
    config=SynthConfig,
    run=run,
    outputs=("out",),
    field_help={
        "out": "Folder to write (FAMILY/FAMILY_00000.obj ... and labels.json).",
        "n": "Number of meshes (families take turns; mesh i depends only on --seed and i).",
        "formats": "File formats, taking turns across meshes: obj, ply, stl, off.",
        "families": "Families to draw: table, chair, shelf, lamp, stool, cabinet, bench, desk.",
        "min_faces": "Fewest triangles per mesh.",
        "max_faces": "Most triangles per mesh.",
    },
)
