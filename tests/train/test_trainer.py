import dataclasses
import json
import math

import pytest
import torch

from meshforge.checkpoints import latest_checkpoint
from meshforge.errors import MeshforgeError
from meshforge.models.registry import load_model
from meshforge.train.distributed import DistEnv
from meshforge.train.logs import read_csv
from meshforge.train.trainer import TrainingRun, _Window, train
from tests.train.toy import ToyTask, toy_config

torch.set_num_threads(1)


def losses(out) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in read_csv(out / "metrics.csv") if "loss" in r}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_continues_the_same_loss_curve(tmp_path, optimizer):
    full = tmp_path / "full"
    train(ToyTask(batch_size=8), toy_config(optimizer=optimizer), full, device="cpu")

    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while fetching the batch of step 21
        train(ToyTask(batch_size=8, interrupt_at=20), toy_config(optimizer=optimizer), split, device="cpu")
    assert latest_checkpoint(split).name == "step_0000020"
    assert max(losses(split)) == 20
    summary = train(ToyTask(batch_size=8), toy_config(optimizer=optimizer), split, device="cpu", resume=True)
    assert summary["resumed_from"] == 20

    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    assert a[40] < 0.6 * a[1]  # and it learns
    val_full = [r["val_loss"] for r in read_csv(full / "metrics.csv") if "val_loss" in r]
    val_split = [r["val_loss"] for r in read_csv(split / "metrics.csv") if "val_loss" in r]
    assert len(val_full) == 2 and val_full == pytest.approx(val_split, abs=1e-6)


class SlowToyTask(ToyTask):
    """Every training step takes 10 s of a fake clock, the first ``first_s`` (compiling kernels)."""

    def __init__(self, clock: list[float], first_s: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.first_s, self.calls = clock, first_s, 0

    def loss(self, model, batch):
        self.clock[0] += self.first_s if self.calls == 0 else 10.0
        self.calls += 1
        return super().loss(model, batch)


def test_time_limit_stops_like_a_last_step_and_resume_finishes_the_curve(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("meshforge.train.trainer.time.perf_counter", lambda: clock[0])
    summary = train(SlowToyTask(clock, first_s=100.0, batch_size=8), toy_config(time_limit_min=1.0),
                    tmp_path / "split", device="cpu")
    # The 60 s count from the end of the 100 s first step: step 8 (at 170 s) is the first to finish
    # past them; it is logged, evaluated and checkpointed.
    assert summary["stopped_by_time_limit"] and summary["last_step"] == 8
    assert summary["first_step_s"] == 100.0  # reported, and not counted against the limit
    assert latest_checkpoint(tmp_path / "split").name == "step_0000008"
    rows = read_csv(tmp_path / "split" / "metrics.csv")
    assert [r["step"] for r in rows if "val_loss" in r] == [8]
    assert (tmp_path / "split" / "curves.png").is_file()
    monkeypatch.undo()

    resumed = train(ToyTask(batch_size=8), toy_config(), tmp_path / "split", device="cpu", resume=True)
    assert resumed["resumed_from"] == 8 and not resumed["stopped_by_time_limit"] and resumed["last_step"] == 40
    train(ToyTask(batch_size=8), toy_config(), tmp_path / "full", device="cpu")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 41)) and max(abs(a[s] - b[s]) for s in a) <= 1e-6


def test_first_step_time_is_the_first_step_alone_without_a_time_limit(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("meshforge.train.trainer.time.perf_counter", lambda: clock[0])
    summary = train(SlowToyTask(clock, first_s=100.0, batch_size=8), toy_config(), tmp_path, device="cpu")
    # Was the whole loop's time (every step overwrote it) when no --time-limit-min was set.
    assert summary["last_step"] == 40 and summary["first_step_s"] == 100.0


def test_interrupt_between_checkpoints_saves_the_last_completed_step(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask(batch_size=8, interrupt_at=13), toy_config(), tmp_path, device="cpu")
    assert latest_checkpoint(tmp_path).name == "step_0000013"


def test_outputs_logs_checkpoints_and_curves(tmp_path):
    summary = train(ToyTask(batch_size=8), toy_config(steps=30, log_every=5), tmp_path, device="cpu")
    rows = read_csv(tmp_path / "metrics.csv")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for key in ("lr", "grad_norm", "acc", "samples_per_s", "tokens_per_s"):
        assert all(key in r for r in train_rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 30]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "config.yaml").is_file()
    # keep_checkpoints=2: steps 20 and 30 remain, latest names 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000020", "step_0000030"]
    assert summary["checkpoint"].endswith("step_0000030")
    meta = json.loads((tmp_path / "checkpoints" / "step_0000030" / "meta.json").read_text())
    assert meta["kind"] == "toy" and meta["step"] == 30 and meta["model_config"] == {"vocab": 13, "width": 16}

    kind, model, meta = load_model(tmp_path, "cpu")
    assert kind == "toy" and not model.training
    task = ToyTask(batch_size=8)
    assert task.evaluate(model)["loss"] == pytest.approx(summary["val_loss"], abs=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(MeshforgeError, match=r"non-finite loss \(nan\) at step 16.*step_0000010"):
        train(ToyTask(batch_size=8, nan_at=15), toy_config(), tmp_path, device="cpu")
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    _, model, _ = load_model(tmp_path, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(losses(tmp_path)) == 15 and all(math.isfinite(v) for v in losses(tmp_path).values())


def test_fresh_run_replaces_earlier_checkpoints(tmp_path):
    train(ToyTask(batch_size=8), toy_config(steps=30), tmp_path, device="cpu")
    train(ToyTask(batch_size=8), toy_config(steps=10), tmp_path, device="cpu")  # no --resume
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000010"]
    assert max(losses(tmp_path)) == 10


def test_log_rows_report_the_share_of_time_spent_waiting_at_the_sync():
    window = _Window()
    window.add({"loss": 1.0, "tokens": 10.0})
    assert "sync_wait_frac" not in window.row(batch_size=2, lr=0.1)  # CPU runs never wait
    window.start -= 2.0  # two seconds of window, half of them blocked at the sync
    window.add_sync_wait(1.0)
    row = window.row(batch_size=2, lr=0.1)
    assert 0.45 < row["sync_wait_frac"] <= 0.5 and row["loss"] == 1.0


def test_resume_below_the_checkpoint_step_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    train(ToyTask(batch_size=8), toy_config(steps=4, eval_every=0, checkpoint_every=2), out, device="cpu")
    with pytest.raises(MeshforgeError, match=r"step_0000004 is at step 4, past --steps 2: pass --steps above 4"):
        train(ToyTask(batch_size=8), toy_config(steps=2), out, device="cpu", resume=True)
    capsys.readouterr()
    summary = train(ToyTask(batch_size=8), toy_config(steps=4), out, device="cpu", resume=True)
    assert summary["last_step"] == 4
    assert "is already at --steps 4: nothing to train" in capsys.readouterr().err


def test_train_step_is_the_trainers_step_clipping_and_refusing_non_finite_losses(tmp_path):
    """A benchmark's single step (TrainingRun.train_step) clips the gradient, counts the step, and
    stops on a non-finite loss before any weight changes."""
    task = ToyTask(batch_size=8, nan_at=1)
    run = TrainingRun(task, toy_config(grad_clip=1e-3), tmp_path, DistEnv(), torch.device("cpu"))
    batches = task.batches(0, 1, seed=0, start_step=0)
    before = [p.detach().clone() for p in run.model.parameters()]
    values = run.train_step(run.model, next(batches))
    assert run.step == 1 and values["grad_norm"] > 1e-3  # the norm before clipping
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(run.model.parameters(), before)])
    assert moved.abs().max() > 0
    after_first = [p.detach().clone() for p in run.model.parameters()]
    with pytest.raises(MeshforgeError, match=r"non-finite loss \(nan\) at step 2"):
        run.train_step(run.model, next(batches))
    assert run.step == 1
    assert all(torch.equal(p, a) for p, a in zip(run.model.parameters(), after_first))


def test_resume_with_other_model_options_names_the_mismatch_and_the_runs_config(tmp_path):
    out = tmp_path / "run"
    train(ToyTask(batch_size=8), toy_config(steps=2, eval_every=0, checkpoint_every=2), out, device="cpu")
    wider = ToyTask(batch_size=8)
    wider.cfg = dataclasses.replace(wider.cfg, width=24)
    with pytest.raises(MeshforgeError) as failure:
        train(wider, toy_config(steps=4), out, device="cpu", resume=True)
    message = str(failure.value)
    assert "weights do not fit the model (size mismatch for " in message
    assert f"resume with --config {out / 'config.yaml'}" in message and "\n" not in message
