"""benchmarks/decode_profile.py's CPU smoke test: both kinds profiled at both ends of a generation,
the bounds derived from the measured figures."""

import json

import pytest


def test_the_cpu_run_profiles_every_window_and_derives_its_bounds(benchmark_script, tmp_path):
    bench = benchmark_script("decode_profile")
    bench.main(["--device", "cpu", "--tiny", "--faces", "4", "--window-faces", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode_profile.json").read_text())
    assert result["benchmark"] == "decode_profile" and result["device"] == "cpu"
    assert set(result["kinds"]) == {"interleaved", "full"}
    for figures in result["kinds"].values():
        windows = figures["windows"]
        assert [w["start_token"] for w in windows] == [0, 18]  # faces 0 and 4 - 2
        # Which ops a step runs depends on its phase only, and a window holds every phase twice.
        assert windows[0]["kernels"] == windows[1]["kernels"] > 0
        for w in windows:
            assert 0 < w["busy_us"] < w["wall_us"]  # the leaf ops' own time, without Python's between them
            assert w["gap_us"] == pytest.approx(w["wall_us"] - w["busy_us"])
            assert sum(k["us"] for k in w["top"]) <= w["busy_us"] * (1 + 1e-9)
            assert w["tokens_per_s"] == pytest.approx(1e6 / w["wall_us"])
            assert w["tokens_per_s_no_gaps"] > w["tokens_per_s"]
            # kernels_for_target kernels at the measured cost each fill exactly a token's time at the target
            assert w["kernels_for_target"] * w["us_per_kernel"] == pytest.approx(1e6 / result["target_tokens_per_s"])
    assert (tmp_path / "decode_profile.png").stat().st_size > 0


def test_a_window_longer_than_the_generation_is_refused(benchmark_script, tmp_path):
    bench = benchmark_script("decode_profile")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tiny", "--faces", "2", "--window-faces", "3", "--out", str(tmp_path)])
