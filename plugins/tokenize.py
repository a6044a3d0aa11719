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
)
