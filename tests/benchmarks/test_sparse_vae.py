"""benchmarks/sparse_vae.py --smoke on the CPU: voxelisation, the timed SS-VAE step and the short
training run with its reconstruction comparison, end to end at tiny sizes."""

import json


def test_smoke_run_times_every_part_and_keeps_the_comparison(benchmark_script, tmp_path):
    bench = benchmark_script("sparse_vae")
    out = tmp_path / "sparse_vae_smoke.json"
    bench.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["smoke"] and result["device"].startswith("CPU")
    assert [row["resolution"] for row in result["voxelize"]] == list(bench.SMOKE.vox_res)
    assert all(row["meshes"] == bench.SMOKE.meshes and row["voxels_per_mesh"] > 0 for row in result["voxelize"])
    step = result["train_step"]
    assert step["resolution"] == bench.SMOKE.step_res and step["step_ms_median"] > 0 and step["input_voxels_per_step"] > 0
    recon = result["reconstruction"]
    assert recon["steps"] == recon["planned_steps"] == bench.SMOKE.train_steps
    # 4 steps decode no surface yet: the failures are counted, the input SDF's own figures are there
    assert recon["meshes"] + recon["failed"] >= 1 and 0 < recon["input_sdf_fscore"] <= 1
    assert (tmp_path / "sparse_vae_smoke_recon.png").is_file() and out.with_suffix(".png").is_file()
