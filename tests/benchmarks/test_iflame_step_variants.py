"""benchmarks/iflame_step_variants.py on CPU: every setting is timed, compiled ones through dynamo."""

import json

import pytest


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("iflame_step_variants")


def test_the_smoke_run_times_every_setting(bench, tmp_path):
    out = tmp_path / "iflame_step_variants.json"
    bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    settings = [(r["attention"], r["grad_checkpoint"], r["compiled"], r["operators_free"]) for r in result["rows"]]
    assert settings == [(a, g, c, False) for a in ("interleaved", "full") for g in (True, False) for c in (False, True)] + [
        ("full", True, False, True), ("full", False, False, True)]
    assert result["compile_backend"] == "eager" and result["device"] == "cpu"
    for row in result["rows"]:
        assert not row["oom"] and row["step_s"] > 0
        assert row["ratio_to_committed"] == pytest.approx(row["step_s"] / result["rows"][0]["step_s"])
    # Every interleaved setting at or under the target is listed (a tiny CPU model is under it).
    assert result["target_reached_by"] == [{"grad_checkpoint": g, "compiled": c} for g in (True, False) for c in (False, True)]
    assert out.with_suffix(".png").stat().st_size > 0
