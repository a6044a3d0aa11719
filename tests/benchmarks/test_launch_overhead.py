"""benchmarks/launch_overhead.py's CPU smoke test: the PyTorch rows timed, the Triton rows named as skipped."""

import json


def test_the_cpu_run_times_every_pytorch_op_and_names_what_it_skips(benchmark_script, tmp_path):
    bench = benchmark_script("launch_overhead")
    bench.main(["--device", "cpu", "--calls", "3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "launch_overhead.json").read_text())
    assert result["benchmark"] == "launch_overhead" and result["device"].startswith("cpu")
    assert [row["op"] for row in result["rows"]] == [
        "aten_add", "rms_norm", "rms_norm_fwd_bwd", "sdpa", "sdpa_fwd_bwd", "block_full_fwd_bwd", "block_linear_fwd_bwd",
    ]  # fmt: skip
    assert all(row["host_us_spread"] >= 0 for row in result["rows"])
    # wall time includes the host's (nothing runs asynchronously on a CPU)
    assert all(0 < row["host_us"] <= row["wall_us"] for row in result["rows"])
    assert result["skipped"] == ["the Triton and fla rows need CUDA"]
    assert (tmp_path / "launch_overhead.png").stat().st_size > 0
