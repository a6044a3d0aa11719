"""The workspace convention: where stages write, and what they read, when no path is given.

Run from one folder, the design card's commands chain with no paths at all::

    meshforge tokenize shapenet/       # writes ./meshforge-data/tokens/shapenet
    meshforge train-iflame --gpus 4    # newest tokenized dataset -> ./runs/iflame-<n> (next free n)
    meshforge sample --n 16            # newest iFlame or SS-DiT run -> RUN/samples
    meshforge eval --metric face-acc   # newest iFlame run, on the dataset its config names

and likewise ``sdf-voxelize DIR`` (``./meshforge-data/sdf/<name>``) -> ``train-vae`` (``./runs/vae-<n>``)
-> ``train-dit`` (newest SDF dataset and SS-VAE run, ``./runs/dit-<n>``). Paths are relative to the
current folder; an explicit path always wins. "Newest" is by modification time of the dataset's
manifest or of the run's ``checkpoints/latest`` pointer, so it is the one finished or updated last.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from meshforge.checkpoints import CHECKPOINTS, LATEST, latest_checkpoint, read_meta, resolve_checkpoint
from meshforge.errors import MeshforgeError

DATA_ROOT = Path("meshforge-data")
RUNS_ROOT = Path("runs")
DatasetKind = Literal["tokens", "sdf"]
MAKES_DATASET = {"tokens": "meshforge tokenize DIR", "sdf": "meshforge sdf-voxelize DIR"}
DATASET_NAME = {"tokens": "tokenized dataset", "sdf": "sparse SDF dataset"}
# Checkpoint kind -> the run-folder prefix and the command that makes such a run.
RUN_PREFIX = {"iflame": "iflame", "ss-vae": "vae", "ss-dit": "dit"}
MAKES_RUN = {"iflame": "meshforge train-iflame", "ss-vae": "meshforge train-vae", "ss-dit": "meshforge train-dit"}
SAMPLES = "samples"


def default_dataset_out(kind: DatasetKind, source: Path) -> Path:
    """``./meshforge-data/KIND/NAME`` for a dataset made from ``source`` (NAME: the input folder's name)."""
    source = Path(source)
    name = source.stem if source.suffix and not source.is_dir() else source.resolve().name
    return DATA_ROOT / kind / name


def newest_dataset(kind: DatasetKind) -> Path:
    """The most recently written dataset of ``kind`` under ``./meshforge-data``."""
    root = DATA_ROOT / kind
    found = [p.parent for p in root.glob("*/manifest.json")]
    if not found:
        raise MeshforgeError(f"no {DATASET_NAME[kind]} under ./{root}: run `{MAKES_DATASET[kind]}` first")
    return max(found, key=lambda p: ((p / "manifest.json").stat().st_mtime_ns, p.name))


def next_run_dir(prefix: str) -> Path:
    """``./runs/PREFIX-<n>``, n one more than the highest taken (1 for the first)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)")
    taken = [int(m.group(1)) for p in RUNS_ROOT.glob(f"{prefix}-*") if (m := pattern.fullmatch(p.name))]
    return RUNS_ROOT / f"{prefix}-{max(taken, default=0) + 1}"


def _run_kind(run: Path) -> str | None:
    try:
        step = latest_checkpoint(run)
        return None if step is None else read_meta(step).get("kind")
    except MeshforgeError:
        return None  # an incomplete run is not a candidate


def newest_run(*kinds: str) -> Path:
    """The run under ``./runs`` (a training run, or a recipe's step inside a run) whose checkpoint
    of one of ``kinds`` was written last."""
    pointers = [*RUNS_ROOT.glob(f"*/{CHECKPOINTS}/{LATEST}"), *RUNS_ROOT.glob(f"*/*/{CHECKPOINTS}/{LATEST}")]
    runs = [p.parent.parent for p in pointers if _run_kind(p.parent.parent) in kinds]
    if not runs:
        makes = " or ".join(f"`{MAKES_RUN[k]}`" for k in kinds)
        raise MeshforgeError(f"no {' or '.join(kinds)} checkpoint under ./{RUNS_ROOT}: run {makes} first")
    return max(runs, key=lambda p: ((p / CHECKPOINTS / LATEST).stat().st_mtime_ns, str(p)))


def training_out(kind: str, options: dict[str, Any]) -> Path:
    """A training stage's run folder: the newest run of ``kind`` to ``--resume``, else the next free one."""
    return newest_run(kind) if options.get("resume") else next_run_dir(RUN_PREFIX[kind])


def run_of(checkpoint: Path) -> Path:
    """The run folder of a run folder, its ``checkpoints`` folder or one of its step folders."""
    path = Path(checkpoint)
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return path.parent if path.name == CHECKPOINTS else path


def run_dataset(checkpoint: Path) -> Path:
    """The dataset a checkpoint was trained on, as its task config recorded it."""
    meta = read_meta(resolve_checkpoint(checkpoint))
    data = (meta.get("task_config") or {}).get("data")
    if data is None:
        raise MeshforgeError(f"{checkpoint}: its checkpoint records no dataset; pass --data")
    return Path(data)


def run_samples(checkpoint: Path) -> Path:
    """Where ``sample`` writes (and ``eval --metric cov-mmd-1nna`` reads) the samples of a run."""
    return run_of(checkpoint) / SAMPLES


def samples_dataset(samples: Path) -> Path:
    """The dataset of the run whose ``samples`` folder this is (the reference set of cov-mmd-1nna)."""
    run = Path(samples).parent
    if Path(samples).name != SAMPLES or not (run / CHECKPOINTS).is_dir():
        raise MeshforgeError(f"{samples}: not the samples folder of a run, so its dataset is unknown; pass --data")
    return run_dataset(run)
