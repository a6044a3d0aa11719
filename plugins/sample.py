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
    field_help={
        "checkpoint": "Checkpoint: a run folder, its checkpoints folder or a step folder "
        "(default: the newest iFlame or SS-DiT run under ./runs).",
        "out": "Folder for sample_000.obj ..., grid.png and stats.json (default: RUN/samples).",
        "n": "Number of meshes to sample.",
        "batch_size": "Meshes sampled at once.",
        "formats": "Mesh file formats to write (obj, ply, glb).",
        "temperature": "iFlame: softmax temperature (0: greedy).",
        "top_k": "iFlame: sample among the k most likely tokens (default: all).",
        "top_p": "iFlame: nucleus sampling mass (default: no truncation).",
        "max_faces": "iFlame: stop a mesh after this many faces (default: what the checkpoint was trained on).",
        "cuda_graphs": "iFlame on CUDA: replay each decoding step as a CUDA graph (off: eager, for debugging).",
        "prompt": "iFlame: complete meshes from this mesh file or token dataset folder (its val meshes in turn); "
        "writes NAME_prompt files beside the completions, prompt faces green in grid.png.",
        "prompt_faces": "iFlame with --prompt: leading faces (canonical order) of each mesh fed as the prompt.",
        "ema": "Use the checkpoint's EMA weights when it has them (--no-ema: the weights as trained).",
        "steps": "SS-DiT: ODE integration steps.",
        "cfg_scale": "SS-DiT: classifier-free guidance scale (conditional models).",
        "sampler": "SS-DiT: ODE integrator (Heun: two model calls per step, more accurate).",
        "image": "SS-DiT: condition on this image.",
        "class_label": "SS-DiT: condition on this class label.",
        "simplify": "Decimate every mesh to at most this many faces (needs fast-simplification: meshforge[post]).",
        "fill_holes": "Fill the holes of every mesh (boundary loops) before writing it.",
    },
)
