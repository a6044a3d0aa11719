"""The one trainer of meshforge: every model trains through :func:`train` with a :class:`TrainTask`.

A task knows its model and data; the trainer owns everything else: precision, optimisers and the
schedule, gradient clipping, data parallelism, checkpoints and resuming, logs and curves.

Determinism is what makes ``--resume`` and ``--gpus N`` trustworthy: a task's batches are a pure
function of ``(seed, step)`` (see :func:`meshforge.train.distributed.global_batch`), and a
checkpoint holds the weights, the optimiser state and every RNG, so a resumed run continues the
loss curve of an uninterrupted one and N processes follow the curve of one.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.markup import escape
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from meshforge.checkpoints import (
    CHECKPOINTS,
    load_ema,
    load_state,
    load_weights,
    resumable_checkpoint,
    save_checkpoint,
    step_name,
)
from meshforge.config import save_config, to_dict
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_write_json, remove_stale_temporaries
from meshforge.runtime import (
    capture_rng,
    compile_model,
    console,
    device_name,
    make_progress,
    progress_enabled,
    restore_rng,
    seed_everything,
    to_device,
)
from meshforge.stages import RunContext
from meshforge.train import distributed
from meshforge.train.config import TrainConfig, TrainOptions
from meshforge.train.distributed import DistEnv
from meshforge.train.ema import EMA
from meshforge.train.logs import MetricsLog, plot_curves
from meshforge.train.optim import build_optimizers, set_lr
from meshforge.train.profiling import StepProfiler

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
SUMMARY_JSON = "summary.json"
TOKENS_KEY = "tokens"  # a metric summed over ranks and reported as tokens/s
OUT_OF_TIME = "_out_of_time"  # rides along with the metrics' reduction; never logged
STOP_ASKED = "_stop_asked"  # likewise: some rank got SIGINT/SIGTERM (data-parallel runs)


class TrainTask(Protocol):
    """What a model brings to the trainer.

    ``name`` is also the checkpoint kind that :func:`meshforge.models.registry.load_model` looks up.
    The task is built with the same global batch size as :attr:`TrainConfig.batch_size`.
    ``batches`` yields this rank's part of each step's global batch, forever, starting at
    ``start_step``, as a pure function of ``(seed, step)``; tensors in it (also inside tuples, lists
    and dicts) are moved to the device by the trainer; it is consumed on a background thread, so it
    must not draw from global RNGs. ``loss`` returns this rank's loss and
    metrics such that their mean over ranks is the global-batch value (use
    :func:`meshforge.train.distributed.global_mean`); a metric named ``tokens`` is instead summed
    over ranks and logged as ``tokens_per_s``. Optionally a task has ``evaluate(model) -> dict``
    (run on rank 0 without gradients, logged with a ``val_`` prefix) and a ``config`` dataclass
    (saved in ``config.yaml`` and the checkpoint metadata).
    """

    name: str

    def build_model(self) -> nn.Module: ...

    def model_config(self) -> Any: ...

    def batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``auto``) or when asked; None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


class _Prefetcher:
    """Builds the next batches on a background thread while the current step runs.

    Batches are a pure function of the step, so prefetching changes neither their order nor their
    content. An exception of the source (a KeyboardInterrupt included) is re-raised in the training
    thread at the position where it happened.
    """

    def __init__(self, source: Iterator[Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), daemon=True, name="meshforge-batches")
        self._thread.start()

    def _fill(self, source: Iterator[Any]) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[Any, BaseException | None] = (next(source), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                item = (None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def __next__(self) -> Any:
        item, exc = self._queue.get()
        if exc is not None:
            raise exc
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Window:
    """Averages of the per-step values between two log rows, and the throughput over them."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0.0
        self.sync_wait: float | None = None
        self.start = time.perf_counter()

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key == TOKENS_KEY:
                self.tokens += value
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def add_sync_wait(self, seconds: float) -> None:
        self.sync_wait = (self.sync_wait or 0.0) + seconds

    def row(self, batch_size: int, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        row = {key: total / self.steps for key, total in self.sums.items()}
        row.update(lr=lr, samples_per_s=batch_size * self.steps / elapsed)
        if self.tokens:
            row["tokens_per_s"] = self.tokens / elapsed
        if self.sync_wait is not None:
            # Near 0: the host is the bottleneck (kernel launches); near 1: the GPU (or, with DDP, a slower rank).
            row["sync_wait_frac"] = self.sync_wait / elapsed
        return row


class TrainingRun:
    """The state of one training run on one process (split from :func:`train` for readability).

    :meth:`train_step` is the one optimisation step; a benchmark times it on its own batches.
    """

    def __init__(self, task: TrainTask, cfg: TrainConfig, out_dir: Path, env: DistEnv, device: torch.device):
        self.task, self.cfg, self.out_dir, self.env, self.device = task, cfg, out_dir, env, device
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = task.build_model().to(device)
        self.optimizers = build_optimizers(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.stop_asked = False  # set by a signal handler under DDP, acted on at the next step's sync
        self.last_saved: Path | None = None
        self.last_row: dict[str, float] = {}
        self.val: dict[str, float] = {}
        self.profile: dict[str, Any] | None = None
        self.sync_wait_s = 0.0  # the last step's wait for the reduction of its values (host sync)
        self.first_step_s: float | None = None  # this run's first step, kernel compilation included
        self.peak_memory_gib: list[float] | None = None  # every rank's training peak (CUDA), after the last step

    # -- resume ---------------------------------------------------------------------------------

    def restore(self, step_dir: Path) -> None:
        state = load_state(step_dir)
        if state["data"]["seed"] != self.cfg.seed:
            raise MeshforgeError(
                f"{step_dir} was trained with seed {state['data']['seed']}; resume with --seed {state['data']['seed']}"
            )
        if len(state["optimizers"]) != len(self.optimizers):
            raise MeshforgeError(f"{step_dir} was trained with a different optimizer setup than --optimizer {self.cfg.optimizer}")
        try:
            load_weights(self.model, step_dir)
        except InputError as exc:
            record = self.out_dir / "config.yaml"
            raise MeshforgeError(f"{exc}; the run's options are in {record}: resume with --config {record}") from None
        if self.ema is not None:
            averages = load_ema(step_dir)
            if averages is None:
                if self.env.is_main:
                    console.print(f"{step_dir} has no EMA weights: the average starts from its weights")
                self.ema = EMA(self.model, self.cfg.ema_decay)
            else:
                self.ema.load_state_dict({k: v.to(self.device) for k, v in averages.items()})
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        rng = state["rng"]
        if self.env.rank < len(rng):
            restore_rng(rng[self.env.rank])
        else:  # more processes than the run was saved with: a fresh, distinct stream per new rank
            seed_everything(self.cfg.seed * 1_000_003 + self.env.rank * 7919 + state["step"])
        self.step = state["step"]
        self.last_saved = step_dir

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> None:
        rng = distributed.gather_objects(capture_rng(), self.env)  # collective: every rank calls save()
        if not self.env.is_main:
            return
        task_cfg = getattr(self.task, "config", None)
        meta = {
            "kind": self.task.name,
            "model_config": to_dict(self.task.model_config()),
            "task": self.task.name,
            "task_config": to_dict(task_cfg) if task_cfg is not None else None,
            "train_config": to_dict(self.cfg),
            "metrics": {**self.last_row, **{f"val_{k}": v for k, v in self.val.items()}},
        }
        state = {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "rng": rng,
            # Batches are a pure function of (seed, step): the step is the data position.
            "data": {"seed": self.cfg.seed, "next_step": self.step, "world_size": self.env.world_size},
        }
        self.last_saved = save_checkpoint(
            self.out_dir, step=self.step, model=self.model, meta=meta, state=state, keep=self.cfg.keep_checkpoints,
            ema=self.ema.state_dict() if self.ema is not None else None,
        )

    # -- evaluation -----------------------------------------------------------------------------

    @property
    def task_evaluates(self) -> bool:
        return callable(getattr(self.task, "evaluate", None))

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics, computed on rank 0 while the other ranks wait."""
        if self.env.is_main:
            self.model.eval()
            amp = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
            with torch.no_grad(), amp:
                self.val = {k: float(v) for k, v in self.task.evaluate(self.model).items()}  # type: ignore[attr-defined]
            self.model.train()
        distributed.barrier(self.env)
        return self.val

    # -- the loop -------------------------------------------------------------------------------

    def run(self, log: MetricsLog | None) -> None:
        cfg, env = self.cfg, self.env
        model: nn.Module = self.model
        if env.active:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            model = compile_model(model)
        model.train()
        batches = _Prefetcher(self.task.batches(env.rank, env.world_size, cfg.seed, self.step))
        profiler = StepProfiler(self.out_dir, env.rank, cfg.profile_steps, self.device)
        window = _Window()
        interrupted = False
        # The clock starts after this run's first step, which compiles kernels (Triton, flash-linear-
        # attention) and autotunes: on a fresh machine that alone can take a minute or more.
        limit_s = 60 * cfg.time_limit_min if cfg.time_limit_min else math.inf
        deadline = math.inf
        loop_start = time.perf_counter()
        with closing(batches), closing(profiler), make_progress() if env.is_main else nullcontext() as progress:
            bar = progress.add_task("train", total=cfg.steps, completed=self.step) if progress else None
            while self.step < cfg.steps:
                lr = set_lr(self.optimizers, self.step, cfg)
                with profiler.phase("data"):
                    batch = to_device(next(batches), self.device)
                values = self.train_step(model, batch, profiler, log, deadline)
                if self.device.type == "cuda":  # on a CPU the host does the work: nothing to wait for
                    window.add_sync_wait(self.sync_wait_s)
                out_of_time = values.pop(OUT_OF_TIME) > 0
                interrupted = values.pop(STOP_ASKED) > 0
                if self.first_step_s is None:
                    self.first_step_s = time.perf_counter() - loop_start
                    deadline = time.perf_counter() + limit_s
                window.add(values)
                last = self.step == cfg.steps or out_of_time or interrupted
                if out_of_time and self.step < cfg.steps and env.is_main:
                    console.print(f"time limit of {cfg.time_limit_min:g} min reached at step {self.step}/{cfg.steps}: "
                                  "stopping here (--resume continues)")

                if self.step % cfg.log_every == 0 or last:
                    self.last_row = window.row(cfg.batch_size, lr)
                    if log is not None:
                        log.log(self.step, self.last_row)
                        if not progress_enabled():
                            shown = ", ".join(f"{k} {v:.4g}" for k, v in self.last_row.items())
                            console.print(f"step {self.step}/{cfg.steps}: {shown}", highlight=False)
                    window = _Window()
                if last and self.device.type == "cuda":
                    # Before the final evaluation and save (rank 0's alone), and a collective among the
                    # run's others: one right before the process group's teardown can abort gloo.
                    peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.peak_memory_gib = [round(p, 3) for p in distributed.gather_objects(peak, env)]
                if self.task_evaluates and (
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or last
                ):
                    val = self.evaluate()
                    if log is not None:
                        log.log(self.step, {f"val_{k}": v for k, v in val.items()})
                    window.start = time.perf_counter()  # throughput counts training only
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save()
                    if log is not None:
                        log.flush()
                    window.start = time.perf_counter()
                if bar is not None:
                    progress.update(bar, completed=self.step, description=f"train loss {values['loss']:.4f}")
                if last:
                    break
        self.profile = profiler.summary
        if interrupted:
            if env.is_main:
                console.print(f"interrupted: saved {self.last_saved}; continue with --resume", soft_wrap=True)
            raise KeyboardInterrupt

    def train_step(self, model: nn.Module, batch: Any, profiler: StepProfiler | None = None,
                   log: MetricsLog | None = None, deadline: float = math.inf) -> dict[str, float]:
        """One optimisation step on ``batch`` (already on the device): forward under autocast, backward,
        gradient clipping, the non-finite check (raises before any update), optimizer and EMA updates.

        ``model`` is :attr:`model` or its DDP / compiled wrapper. Returns the loss, the task's metrics
        and the gradient norm averaged over ranks, with the two stop flags every rank must agree on
        (``OUT_OF_TIME``: past ``deadline``, a ``time.perf_counter()`` value; ``STOP_ASKED``: a signal
        came); the wait for that reduction is left in :attr:`sync_wait_s`.
        """
        cfg = self.cfg
        phase = profiler.phase if profiler is not None else (lambda name: nullcontext())
        amp = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        with phase("forward"), amp:
            loss, metrics = self.task.loss(model, batch)
        with phase("backward"):
            loss.backward()
        with phase("clip_sync"):
            clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            # One host sync per step: the check must come before the update, so that a
            # non-finite loss or gradient never reaches the weights (or a checkpoint).
            # The clock is averaged like a metric, so every rank takes the same decision to stop.
            launched = time.perf_counter()
            values = self._reduce({"loss": loss, **metrics, "grad_norm": grad_norm,
                                   OUT_OF_TIME: launched > deadline, STOP_ASKED: self.stop_asked})
            self.sync_wait_s = time.perf_counter() - launched
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self._stop_non_finite(values, log)
        with phase("optimizer"):
            for opt in self.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.step)
        if profiler is not None:
            profiler.step()
        self.step += 1
        return values

    def _reduce(self, values: dict[str, Any]) -> dict[str, float]:
        """Means over ranks (sums for ``tokens``) as Python floats."""
        stacked = torch.stack([torch.as_tensor(v, device=self.device).detach().float().reshape(()) for v in values.values()])
        means = distributed.mean_over_ranks(stacked, self.env).tolist()
        out = dict(zip(values, means))
        if TOKENS_KEY in out:
            out[TOKENS_KEY] *= self.env.world_size
        return out

    def _stop_non_finite(self, values: dict[str, float], log: MetricsLog | None) -> None:
        if log is not None:
            log.flush()
        what, value = ("loss", values["loss"]) if not math.isfinite(values["loss"]) else ("gradient norm", values["grad_norm"])
        kept = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
        raise MeshforgeError(
            f"non-finite {what} ({value}) at step {self.step + 1}: "
            f"training stopped before updating the weights; {kept} (try a lower --lr or check the data, then --resume)"
        )


@contextmanager
def _stop_on_signals(run: TrainingRun) -> Iterator[None]:
    """Under DDP, SIGINT/SIGTERM (which the launcher forwards to every worker on Ctrl-C) ask for a
    stop instead of interrupting: the ranks agree at the next step's reduction, save the checkpoint
    together and then raise KeyboardInterrupt. A second signal interrupts at once."""

    def ask(signum: int, frame: Any) -> None:
        if run.stop_asked:
            raise KeyboardInterrupt
        run.stop_asked = True

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(task: TrainTask, cfg: TrainConfig, out_dir: Path, device: torch.device | str = "cpu",
          resume: bool = False) -> dict[str, Any]:
    """Train ``task`` for ``cfg.steps`` steps into ``out_dir``; returns a JSON-able summary.

    Writes ``config.yaml``, ``metrics.csv`` (+ ``tensorboard/`` when installed), ``curves.png``,
    ``summary.json`` and ``checkpoints/``. With ``resume`` the run continues from the newest intact step folder
    when there is one (damaged newer ones are reported and removed); without it, checkpoints of an
    earlier run in ``out_dir`` are removed first. Under torchrun
    (``--gpus N``) every process calls this; rank 0 alone writes files.
    """
    out_dir = Path(out_dir)
    env, dev = distributed.setup(device)
    try:
        distributed.rank_slice(cfg.batch_size, env.rank, env.world_size)  # the batch must split evenly
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")
        run = TrainingRun(task, cfg, out_dir, env, dev)
        checkpoints = out_dir / CHECKPOINTS
        previous, damaged = resumable_checkpoint(out_dir) if resume else (None, [])
        distributed.barrier(env)  # every rank has looked before rank 0 deletes anything
        if env.is_main:
            # A writer killed mid-save leaves its temporary folder; it holds no usable checkpoint.
            remove_stale_temporaries(checkpoints)
            for step_dir, problem in damaged:
                # Newer than the one resumed from, so this run rewrites that step anyway; kept, it
                # would count against keep_checkpoints and shadow the good one.
                console.print(f"[yellow]{step_dir.name} is damaged ({escape(problem)}): resuming from "
                              f"{previous.name}, removing it[/yellow]")
                shutil.rmtree(step_dir, ignore_errors=True)
        if previous is not None:
            run.restore(previous)
            if run.step > cfg.steps:
                raise MeshforgeError(
                    f"{previous} is at step {run.step}, past --steps {cfg.steps}: pass --steps above {run.step} "
                    "to train on, or leave out --resume to start afresh"
                )
            if run.step == cfg.steps and env.is_main:
                console.print(f"{previous} is already at --steps {cfg.steps}: nothing to train (raise --steps to go on)")
        else:
            if env.is_main and not resume and any(checkpoints.glob("step_*")):
                console.print(f"[yellow]starting afresh in {out_dir}: removing its earlier checkpoints "
                              "(pass --resume to continue them)[/yellow]")
                shutil.rmtree(checkpoints)
            seed_everything(cfg.seed + env.rank)  # ranks draw different random numbers (dropout, noise)

        log = None
        if env.is_main:
            task_cfg = getattr(task, "config", None)
            save_config(
                {"task": task.name, "train": cfg, "model": task.model_config(), "task_config": task_cfg},
                out_dir / "config.yaml",
            )
            log = MetricsLog(out_dir / METRICS_CSV, keep_until_step=run.step)
        start_step, start = run.step, time.perf_counter()
        try:
            with _stop_on_signals(run) if env.active else nullcontext():
                run.run(log)
        except KeyboardInterrupt:
            # One process checkpoints here on its own; under DDP saving is a collective, so there
            # the signal handler lets every rank finish its step and save together (see _stop_on_signals).
            if not env.active and run.step > start_step and (run.last_saved is None or run.last_saved.name != step_name(run.step)):
                run.save()
                console.print(f"interrupted: saved {run.last_saved}; continue with --resume", soft_wrap=True)
            raise
        finally:
            if log is not None:
                log.close()
        summary: dict[str, Any] = {
            "steps": cfg.steps,
            "last_step": run.step,
            "stopped_by_time_limit": run.step < cfg.steps,  # a run only returns early on its time limit
            "resumed_from": start_step if start_step else None,
            "world_size": env.world_size,
            "device": device_name(run.device),  # what its speeds are of
            "wall_time_s": round(time.perf_counter() - start, 3),
            # What the time limit does not count: on a fresh machine mostly Triton compiling and autotuning.
            "first_step_s": None if run.first_step_s is None else round(run.first_step_s, 3),
            "peak_memory_gib": run.peak_memory_gib,
            **run.last_row,
            **{f"val_{k}": v for k, v in run.val.items()},
        }
        if run.profile is not None:
            summary["profile"] = run.profile
        if env.is_main:
            if log is not None and log.rows:
                plot_curves(out_dir / METRICS_CSV, out_dir / CURVES_PNG)
            summary["checkpoint"] = str(run.last_saved) if run.last_saved else None
            atomic_write_json(out_dir / SUMMARY_JSON, summary)
        return summary
    finally:
        distributed.teardown(env)


def run_training_stage(
    stage: str, cfg: TrainOptions, ctx: RunContext, make_task: Callable[[], TrainTask], cli_module: str
) -> dict[str, Any]:
    """What a training stage (``train-iflame``, ``train-vae``, ...) runs on its config, which extends
    :class:`TrainOptions`.

    With ``--gpus N`` (N > 1) outside torchrun, the resolved config is saved as ``OUT/launch.yaml``
    and N workers run ``python -m CLI_MODULE STAGE --config OUT/launch.yaml``; each of them (and a
    plain single-process run) builds the task and trains. Returns rank 0's summary.
    """
    out_dir = Path(cfg.out)
    if cfg.gpus > 1 and not distributed.in_worker():
        # CPU processes only when asked for by name: on a machine without enough GPUs, "auto" would
        # otherwise start N slow CPU workers of a GPU-sized model without a word.
        if ctx.device != "cpu" and torch.cuda.device_count() < cfg.gpus:
            raise MeshforgeError(
                f"--gpus {cfg.gpus} but only {torch.cuda.device_count()} CUDA devices are visible "
                f"(for {cfg.gpus} CPU processes pass --device cpu)"
            )
        launch_file = out_dir / "launch.yaml"
        save_config(cfg, launch_file)
        args = [stage, "--config", str(launch_file), "--device", ctx.device, "--seed", str(ctx.seed)]
        distributed.launch(cfg.gpus, cli_module, args)
        return json.loads((out_dir / SUMMARY_JSON).read_text())
    train_cfg = TrainConfig.from_options(cfg, seed=ctx.seed)
    return train(make_task(), train_cfg, out_dir, device=ctx.torch_device, resume=cfg.resume)
