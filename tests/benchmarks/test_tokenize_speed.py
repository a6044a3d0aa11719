"""benchmarks/tokenize_speed.py on a few meshes: every mesh tokenised, the rates consistent with the counts."""

import json

import pytest


def test_a_small_run_tokenises_every_mesh_in_every_format(benchmark_script, tmp_path):
    out = tmp_path / "tokenize_speed.json"
    benchmark_script("tokenize_speed").main(["--meshes", "24", "--workers", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meshes"] == 24 and result["skipped"] == 0 and result["device"]["workers"] == 1
    assert result["tokens"] > 0 and result["tokens"] % 9 == 0  # whole faces (END included)
    # seconds are recorded to the millisecond (rates from the unrounded time): up to 0.5 ms / seconds apart
    rel = 0.0005 / result["seconds"]
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"], rel=rel, abs=1)
    assert result["meets_target"] == (result["seconds"] < result["target_seconds"])
