"""benchmarks/direct3d_scale.py --quick on the CPU: the SS-VAE rows (gradient checkpointing included),
SSA against dense attention on real latents, and one sample from noise to mesh."""

import json

import pytest


@pytest.mark.slow
def test_quick_run_fills_every_section(benchmark_script, tmp_path):
    bench = benchmark_script("direct3d_scale")
    out = tmp_path / "direct3d_scale_quick.json"
    bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["quick"]
    vae = [(r["resolution"], r["batch"], r["grad_checkpoint"]) for r in result["vae"]]
    assert vae == list(bench.QUICK.vae_rows) and all(r["step_s"] > 0 and r["input_voxels"] > 0 for r in result["vae"])
    dit = {(r["latent_grid"], r["attention"]) for r in result["dit"]}
    assert dit == {(grid, kind) for grid in bench.QUICK.dit_grids for kind in ("ssa", *bench.QUICK.dense)}
    assert all(r["step_s"] > 0 and r["tokens"] > 0 for r in result["dit"])
    largest = max(r["tokens"] for r in result["dit"])
    at_largest = {r["attention"]: r["step_s"] for r in result["dit"] if r["tokens"] == largest}
    assert result["dit_speedup_at_largest"]["ssa_vs_dense-math"] == pytest.approx(
        at_largest["dense-math"] / at_largest["ssa"], abs=0.01)  # rounded to 2 decimals
    assert result["sample"]["resolution"] == bench.QUICK.sample_resolution and result["sample"]["seconds"] > 0
