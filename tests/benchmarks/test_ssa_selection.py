"""benchmarks/ssa_selection.py --ab on CPU: the training A/B of runs that differ only in the query tile."""

import json
from pathlib import Path

import pytest

from meshforge.config import save_config
from meshforge.errors import InputError
from meshforge.train.logs import MetricsLog


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("ssa_selection")


def fake_run(root: Path, tile: int, losses: list[float], lr: float = 5e-4) -> Path:
    """A train-dit run folder as the trainer leaves it: config.yaml, metrics.csv, summary.json."""
    run = root / f"tile{tile}"
    dit = {"dim": 64, "attention": "ssa", "ssa_query_tile": tile}
    save_config({"task": "ss-dit", "train": {"lr": lr, "out": str(run)}, "model": {"dit": dit},
                 "task_config": {"lr": lr, "out": str(run), "model": {"dit": dit}}}, run / "config.yaml")
    log = MetricsLog(run / "metrics.csv")
    for i, loss in enumerate(losses):
        log.log(10 * (i + 1), {"loss": loss})
    log.close()
    (run / "summary.json").write_text(json.dumps({"last_step": 10 * len(losses), "wall_time_s": 5.0 * tile,
                                                  "samples_per_s": 100.0 / tile, "val_latent": losses[-1]}))
    return run


def test_ab_compares_losses_at_shared_steps_and_keeps_the_other_figures(bench, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "ssa_selection.json").write_text(json.dumps({"device": "NVIDIA H200", "summary": [1]}))
    a = fake_run(tmp_path, 64, [3.0, 2.0, 1.0, 0.9, 0.8, 0.7])
    b = fake_run(tmp_path, 16, [3.0, 1.9, 0.9, 0.8])
    bench.main(["--ab", f"64={a}", f"16={b}", "--out", str(out)])
    result = json.loads((out / "ssa_selection.json").read_text())
    assert result["device"] == "NVIDIA H200" and result["summary"] == [1]
    ab = result["training_ab"]
    assert [r["query_tile"] for r in ab["rows"]] == [64, 16]
    assert ab["rows"][0]["loss_last_5_rows"] == pytest.approx((2.0 + 1.0 + 0.9 + 0.8 + 0.7) / 5)
    assert ab["rows"][1]["steps"] == 40 and ab["rows"][1]["val_latent"] == 0.8
    assert ab["loss_at_shared_steps"][-1] == {"step": 40, "tile_64": 0.9, "tile_16": 0.8}
    assert len(ab["loss_at_shared_steps"]) == 4 and (out / "ssa_selection_ab.png").stat().st_size > 0


def test_ab_refuses_runs_that_differ_in_more_than_the_tile(bench, tmp_path):
    a = fake_run(tmp_path, 64, [1.0])
    b = fake_run(tmp_path, 16, [1.0], lr=1e-3)
    with pytest.raises(InputError, match="differs from the tile-64 run in task_config.lr"):
        bench.main(["--ab", f"64={a}", f"16={b}", "--out", str(tmp_path / "results")])
