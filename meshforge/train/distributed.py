"""Data-parallel training: launching processes, the process group, and the global-batch sampler.

``meshforge train-iflame --gpus N`` (likewise train-vae, train-dit) re-launches itself as N worker processes through torch's own
launcher (``torch.distributed.run``, i.e. torchrun, standalone rendezvous on this node). Workers
recognise themselves by the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
train instead of launching again. Multi-node runs use torchrun directly with the same command::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m meshforge_plugins.cli train-iflame --data D --out O
    # and --node-rank 1 on the second node (same --out on a shared filesystem); train-vae and
    # train-dit the same way (tests/train/test_dit_task.py runs this with two launchers on localhost)

Every process sees the same global batch of ``batch_size`` items, derived from ``(seed, step)``,
and trains on its own contiguous slice of it, so 1 and N processes follow the same loss curve.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from meshforge.errors import MeshforgeError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def in_worker() -> bool:
    """True inside a process started by torchrun (single- or multi-node)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_env() -> DistEnv:
    """This process's place in the run, from torchrun's environment (rank 0 of 1 outside torchrun);
    readable before the process group exists."""
    if not in_worker():
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def launch(nproc: int, module: str, args: list[str]) -> None:
    """Run ``python -m module *args`` as ``nproc`` workers on this node; returns when all have finished."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # The rendezvous logs a dozen INFO lines per launch wherever the root logger lets INFO through.
    torch_logger = logging.getLogger("torch.distributed")
    level = torch_logger.level
    torch_logger.setLevel(logging.WARNING)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", module, *args])
    except SignalException:
        # torchrun has forwarded the signal to the workers and waited for them (rank 0 saves a
        # checkpoint on the way out: see meshforge.train.trainer); to the user this is a Ctrl-C.
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in exc.failures.items())
        raise MeshforgeError(f"training worker failed ({failures}); its error is printed above") from None
    finally:
        torch_logger.setLevel(level)


def setup(device: torch.device | str) -> tuple[DistEnv, torch.device]:
    """Join the process group when running under torchrun; the device this process trains on
    (``device``, or under torchrun on CUDA this process's GPU)."""
    dev = torch.device(device)
    env = process_env()
    if not env.active:
        return DistEnv(), dev
    if dev.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise MeshforgeError(
                f"local rank {env.local_rank} needs GPU {env.local_rank} but only {torch.cuda.device_count()} are visible"
            )
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return env, dev


def teardown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise mean of a tensor over all processes (identity for one process)."""
    if not env.active:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


def global_mean(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """This rank's share of a mean over the *global* batch: ``total / global count * world``.

    Tasks return per-rank losses and metrics, which DDP (gradients) and the trainer (logged
    values) average over ranks. Averaging per-rank means would weight ranks equally however many
    targets each holds; scaling each rank's sum by the global count instead makes the average over
    ranks exactly the mean over the whole batch, as one process would compute it.
    """
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return total * dist.get_world_size() / count.clamp(min=1)
    return total / count.clamp(min=1)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _epoch_stream(num_items: int, seed: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Items ``start .. start+count-1`` of the stream of shuffled epochs laid end to end, and their epochs."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_items)
    indices = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        mask = epochs == epoch
        indices[mask] = order[offsets[mask]]
    return indices, epochs


def global_batch(
    num_items: int, batch_size: int, seed: int, step: int, lengths: np.ndarray | None = None, groups: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, epochs) of the global batch of ``step``: shuffled epochs laid end to end.

    A pure function of its arguments, so resuming at any step, or splitting the batch over any
    number of processes, reproduces exactly the batches of an uninterrupted single-process run.
    The epoch of each item lets per-item augmentation be seeded by ``(seed, epoch, index)``.

    With ``lengths`` (per item) and ``groups > 1``, every ``groups`` consecutive batches are drawn
    together, sorted by length and cut into batches of similar lengths, taken in a seeded random
    order: the items and epochs are the same, but a batch pads to far less than its longest
    random member (and the ranks of a data-parallel step get similar work).
    """
    if num_items < 1:
        raise MeshforgeError("cannot sample batches from an empty dataset")
    if lengths is None or groups <= 1:
        return _epoch_stream(num_items, seed, step * batch_size, batch_size)
    group, slot = divmod(step, groups)
    indices, epochs = _epoch_stream(num_items, seed, group * groups * batch_size, groups * batch_size)
    by_length = np.argsort(-np.asarray(lengths)[indices], kind="stable").reshape(groups, batch_size)
    rows = by_length[np.random.default_rng([seed, group, 1]).permutation(groups)[slot]]
    return indices[rows], epochs[rows]


def check_train_size(num_items: int, batch_size: int, data: Path | str) -> None:
    """A training split must hold at least one global batch: a larger batch only repeats items
    within a step, which costs memory (far beyond the device's, for a typo like 1600) and teaches nothing."""
    if num_items == 0:
        raise MeshforgeError(f"{data}: the train split is empty")
    if batch_size > num_items:
        raise MeshforgeError(
            f"--batch-size {batch_size} is more than the {num_items} training items of {data}: "
            f"pass --batch-size {num_items} or less"
        )


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The contiguous part of a global batch that ``rank`` trains on."""
    if batch_size % world_size:
        raise MeshforgeError(
            f"batch_size {batch_size} is the global batch and must divide evenly over {world_size} processes"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)
