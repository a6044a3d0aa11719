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
)
