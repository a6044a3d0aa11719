"""benchmarks/direct3d_ddp.py --quick on CPU: train-vae and train-dit on 1 and 2 gloo processes, one result."""

import json

import pytest


@pytest.mark.slow
def test_quick_run_writes_matching_curves_and_scaling(benchmark_script, tmp_path):
    direct3d_ddp = benchmark_script("direct3d_ddp")

    result = tmp_path / "direct3d_ddp.json"
    direct3d_ddp.main(["--quick", "--out", str(tmp_path / "work"), "--result", str(result)])
    got = json.loads(result.read_text())
    assert got["benchmark"] == "direct3d_ddp" and "2 gloo processes" in got["device"] and got["processes"] == [1, 2]
    for model in ("vae", "dit"):
        r = got[model]
        runs = r["runs"]
        assert runs["1"]["world_size"] == 1 and runs["2"]["world_size"] == 2
        assert runs["1"]["steps"] == runs["2"]["steps"] == [2, 4]
        # fp32 on the CPU: the curves differ only by the all-reduce's summation order (see the task tests).
        assert r["curves_match"] and r["loss_max_abs_diff"] < 1e-5, (model, r["loss_max_abs_diff"])
        assert r["scaling_efficiency"] == pytest.approx(r["samples_per_s"]["2"] / r["samples_per_s"]["1"] / 2)
        assert r["tokens_per_s"]["1"] > 0 and r["peak_memory_gib"] == {"1": None, "2": None}  # CUDA only
    assert result.with_suffix(".png").stat().st_size > 10_000
