"""benchmarks/profile_diff.py: two profiled runs' summaries side by side and their operators matched by name."""

import json

import pytest

from meshforge.errors import InputError
from meshforge.train.trainer import train
from tests.train.toy import ToyTask, toy_config


def summary(step_s: float, operators: dict[str, float]) -> dict:
    return {"step_s": step_s, "gpu_busy_s": None, "gpu_busy_frac": None, "kernel_time_s": None, "comm_s": None,
            "launches": 0.0, "phases_s": {"forward": step_s / 2, "backward": step_s / 2},
            "top_operators": [{"name": n, "self_s": t, "calls": 2.0} for n, t in operators.items()]}


def test_operators_are_matched_by_name_and_ordered_by_the_size_of_their_difference(benchmark_script):
    bench = benchmark_script("profile_diff")
    a = summary(0.010, {"mm": 0.004, "norm": 0.003, "copy": 0.001})
    b = summary(0.008, {"mm": 0.0041, "flash": 0.002, "copy": 0.001})
    got = bench.compare(a, b, top=3)
    assert [op["name"] for op in got["operators"]] == ["norm", "flash", "mm"]  # |3| > |-2| > |-0.1| ms
    norm, flash = got["operators"][:2]
    assert (norm["self_s_b"], norm["calls_b"], flash["self_s_a"]) == (0.0, 0.0, 0.0)  # outside one run's list
    assert got["listed_diff_s"] == pytest.approx(0.003 - 0.002 - 0.0001)  # copy's 0 included
    assert got["figures"]["step_s"] == {"a": 0.010, "b": 0.008} and got["phases_s"]["forward"]["a"] == 0.005


def test_two_profiled_runs_are_compared_from_their_folders(benchmark_script, tmp_path):
    for name, batch in (("small", 4), ("large", 16)):
        train(ToyTask(batch_size=batch), toy_config(steps=14, profile_steps=2), tmp_path / name, device="cpu")
    out = tmp_path / "diff.json"
    benchmark_script("profile_diff").main([str(tmp_path / "small"), str(tmp_path / "large"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["labels"] == ["small", "large"] and result["operators"]
    assert result["figures"]["step_s"]["a"] > 0 and result["figures"]["step_s"]["b"] > 0
    assert out.with_suffix(".png").is_file()


def test_a_profile_is_named_after_its_run_folder(benchmark_script, tmp_path):
    bench = benchmark_script("profile_diff")
    assert bench.run_folder(tmp_path) == tmp_path
    assert bench.run_folder(tmp_path / "run" / "profile" / "rank0.json") == tmp_path / "run"
    assert bench.run_folder(tmp_path / "copied" / "rank0.json") == tmp_path / "copied"


def test_a_run_without_a_profile_is_named_in_one_line(benchmark_script, tmp_path):
    with pytest.raises(InputError, match="rank0.json.*--profile-steps"):
        benchmark_script("profile_diff").load_profile(tmp_path, 0)
