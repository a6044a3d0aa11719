"""benchmarks/iflame_ddp.py on CPU: train-iflame on 1 and 2 gloo processes from the real CLI, one result."""

import json

import pytest


@pytest.mark.slow
def test_cpu_run_on_two_gloo_processes_follows_the_one_process_curve(benchmark_script, tmp_path):
    result = tmp_path / "iflame_ddp.json"
    benchmark_script("iflame_ddp").main([
        "--device", "cpu", "--gpus", "2", "--steps", "4", "--log-every", "2", "--batch-size", "4",
        "--warmup-steps", "1", "--model-dim", "32", "--model-heads", "2", "--model-blocks", "1", "1", "2", "1", "1",
        "--max-faces", "20", "--synth-meshes", "12", "--eval-meshes", "2", "--profile-steps", "0",
        "--out", str(tmp_path / "work"), "--result", str(result),
    ])  # fmt: skip
    got = json.loads(result.read_text())
    assert got["benchmark"] == "iflame_ddp" and "2 gloo processes" in got["device"] and got["processes"] == [1, 2]
    # fp32 on the CPU: the two curves differ only by the all-reduce's summation order (as direct3d_ddp's).
    assert got["curves_match"] and got["loss_max_abs_diff"] < 1e-5
    assert got["rerun_max_abs_diff"] is None  # the rerun is for CUDA's non-deterministic kernels
    assert got["scaling_efficiency"] == pytest.approx(got["samples_per_s"]["gpus2"] / got["samples_per_s"]["gpus1"] / 2)
    assert result.with_suffix(".png").stat().st_size > 10_000
