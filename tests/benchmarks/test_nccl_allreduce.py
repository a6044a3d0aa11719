"""benchmarks/nccl_allreduce.py's smoke test: two gloo processes on CPU, as torchrun starts them."""

import json
import subprocess
import sys


def test_two_cpu_processes_all_reduce_and_rank_0_writes_the_table(benchmark_script, tmp_path):
    script = benchmark_script("nccl_allreduce").__file__
    out = tmp_path / "nccl_allreduce.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
         "--device", "cpu", "--sizes-mb", "1", "4", "--repeat", "2", "--out", str(out)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"] == "cpu x2" and result["backend"] == "gloo" and result["world_size"] == 2
    assert [row["size_mb"] for row in result["rows"]] == [1, 4]
    for row in result["rows"]:  # bus bandwidth is the algorithm's times 2 (n - 1) / n = 1 at two processes
        assert row["ms"] > 0 and row["busbw_gbps"] == row["algbw_gbps"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
