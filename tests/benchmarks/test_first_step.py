"""benchmarks/first_step.py on CPU: a fresh process times its first and steady step; the result's rows."""

import argparse
import json

import pytest

TINY = ["--device", "cpu", "--dim", "32", "--heads", "2", "--batch", "1", "--faces", "8"]


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("first_step")


def test_a_fresh_process_times_its_first_and_its_steady_step(bench):
    args = argparse.Namespace(device="cpu", dim=32, heads=2, batch=1, faces=8)
    timing = bench.timed_fresh(args, "interleaved", configs=False)
    assert set(timing) == {"first_step_s", "steady_step_s"}
    assert timing["first_step_s"] > 0 and timing["steady_step_s"] > 0


def test_the_result_has_a_row_per_model_and_fla_setting(bench, tmp_path, monkeypatch):
    calls = []

    def fake_fresh(args, attention, configs):
        calls.append((attention, configs, args.batch, args.faces))
        return {"first_step_s": 10.0 if configs else 90.0, "steady_step_s": 0.5}

    monkeypatch.setattr(bench, "timed_fresh", fake_fresh)
    out = tmp_path / "first_step.json"
    bench.main([*TINY, "--out", str(out)])  # no table recorded for a CPU: no "recorded" row
    assert calls == [("interleaved", False, 1, 8), ("full", False, 1, 8)]
    result = json.loads(out.read_text())
    assert [(r["attention"], r["fla_configs"]) for r in result["rows"]] == [("interleaved", "autotuned"), ("full", None)]
    assert result["table"] is None and result["device"] == "cpu"
    assert out.with_suffix(".png").stat().st_size > 0

    # With a table for the device, the interleaved model is also timed with it.
    monkeypatch.setattr(bench.fla_configs, "CONFIG_DIR", tmp_path)
    (tmp_path / "cpu.json").write_text("{}")
    calls.clear()
    bench.main([*TINY, "--out", str(out)])
    assert [c[:2] for c in calls] == [("interleaved", False), ("interleaved", True), ("full", False)]
    result = json.loads(out.read_text())
    assert result["table"] == str(tmp_path / "cpu.json")
    assert [r["fla_configs"] for r in result["rows"]] == ["autotuned", "recorded", None]


def test_recording_needs_a_gpu(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--record"])
